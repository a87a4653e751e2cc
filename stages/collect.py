"""DVC stage collect: run a Hugging Face MoE model over the text sources (or import routing recorded elsewhere)
and write trace chunks + meta.json into --out. The work is moe_prefetch.collect.collector.collect.

    python -m stages.collect --out data/traces
    accelerate launch --multi_gpu --num_processes N -m stages.collect --out data/traces   # data-parallel
"""

import os

from moe_prefetch.cli import run_stage, stage_arguments
from moe_prefetch.collect.collector import collect
from moe_prefetch.collect.config import CollectParams


def main() -> None:
    params, args = stage_arguments("collect", CollectParams, "Record MoE routing of a model over text sources.", "out")
    collect(params, args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_stage(main)
