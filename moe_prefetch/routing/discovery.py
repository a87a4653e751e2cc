"""Which model families of the installed transformers are routed MoE models, found by reading their modeling code.

A family is one directory of `transformers/models/` (several `config.model_type`s can share it: `llama4` and
`llama4_text`, `glm4v_moe` and `glm4v_moe_text`). It counts as a routed MoE family when one class defined in its
`modeling_*.py` files has an `__init__` that assigns

- a router: a module (built by a call) in an attribute named `router` or `gate`, or ending in `_router` /
  `_gate` / starting with `router_` (`gate_proj` of a gated MLP does not match), and
- experts: an attribute whose name contains `experts`, or whose value is built by a class whose name contains
  `Experts` (JetMoE's `input_linear = JetMoeParallelExperts(...)`), or the class reads a top-k from the config
  (`num_experts_per_tok`, `moe_topk`, `moe_top_k`: Doge's embedding experts have no experts module).

The files are parsed (`ast`), not imported, so a family whose optional dependencies are missing is still found.
A dense model with a gated MLP (`gate_proj` only) or a gate without experts (a gated attention) is not an MoE
family; ViTPose's experts are picked by a dataset index, not routed, and have no router.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROUTER_NAME = re.compile(r"^(router|gate)$|_(router|gate)$|^router_")
TOP_K_KEYS = frozenset({"num_experts_per_tok", "moe_topk", "moe_top_k"})


def models_dir() -> Path:
    """transformers' `models/` directory, one sub-directory per family."""
    import transformers.models

    return Path(transformers.models.__file__).parent


def _assigned_attributes(init: ast.FunctionDef) -> dict[str, ast.expr]:
    """`self.<name> = value` assignments of an `__init__`, name -> value."""
    assigned = {}
    for node in ast.walk(init):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                assigned[target.attr] = node.value
    return assigned


def _called_name(value: ast.expr | None) -> str:
    """The names of the classes or functions a value is built by (`Foo(...)`, `nn.Foo(...)`, `A(c) if x else B(c)`),
    space-separated, or ''."""
    names = []
    for node in ast.walk(value) if value is not None else ():
        if isinstance(node, ast.Call):
            func = node.func
            names.append(func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else "")
    return " ".join(name for name in names if name)


def is_moe_class(node: ast.ClassDef) -> bool:
    """Whether a class's `__init__` assigns a router and experts (the module docstring gives the rule)."""
    init = next((item for item in node.body if isinstance(item, ast.FunctionDef) and item.name == "__init__"), None)
    if init is None:
        return False
    assigned = _assigned_attributes(init)
    # only modules count: `self.router_aux_loss_coef = config.router_aux_loss_coef` is not a router
    has_router = any(ROUTER_NAME.search(name) and _called_name(value) for name, value in assigned.items())
    has_experts = any(("experts" in name and _called_name(value) not in ("", "int", "getattr")) or "Experts" in _called_name(value)
                      for name, value in assigned.items())
    reads_top_k = any(isinstance(sub, ast.Attribute) and sub.attr in TOP_K_KEYS for sub in ast.walk(init))
    return has_router and (has_experts or reads_top_k)


@cache
def moe_classes(family: str) -> tuple[str, ...]:
    """Names of the classes of family `family`'s modeling files that are routed MoE blocks (empty: not MoE)."""
    found = []
    for path in sorted((models_dir() / family).glob("modeling_*.py")):
        source = path.read_text(encoding="utf-8")
        if "xperts" not in source and not any(key in source for key in TOP_K_KEYS):
            continue  # parsing is the slow part; a file that never names experts or a top-k has no MoE block
        tree = ast.parse(source)
        found += [node.name for node in tree.body if isinstance(node, ast.ClassDef) and is_moe_class(node)]
    return tuple(found)


def moe_families() -> list[str]:
    """Every family directory of the installed transformers that holds a routed MoE block, sorted."""
    return sorted(path.name for path in models_dir().iterdir() if path.is_dir() and moe_classes(path.name))


def family_of(model_type: str) -> str:
    """The family directory of a `config.model_type` ("nllb-moe" -> "nllb_moe", "llama4_text" -> "llama4")."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    if model_type not in CONFIG_MAPPING_NAMES:
        return model_type_to_module_name(model_type)
    config_class = CONFIG_MAPPING_NAMES[model_type]
    import transformers

    return getattr(transformers, config_class).__module__.split(".")[2]
