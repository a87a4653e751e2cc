"""Write the HTML template for `dvc plots show --html-template`: Vega, Vega-Lite and Vega-Embed inlined from
node_modules (`npm ci`), so the page DVC writes renders from file:// with no network.

    python scripts/plots_page.py dvc_plots/template.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

NODE_MODULES = Path(__file__).resolve().parents[1] / "node_modules"
LIBRARIES = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")
# DVC fills these by plain text replacement, and `</script` would end the inline script early.
FORBIDDEN = ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}")

# No `{scripts}` placeholder: DVC would put its CDN <script src> tags there.
PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>moe_prefetch plots</title>
<style>
  body { font-family: sans-serif; display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
</style>
<!-- libraries -->
</head>
<body>
{plot_divs}
</body>
</html>
"""


def library_script(path: Path) -> str:
    """One inline <script> with the library's code (its source-map comment dropped: there is no map next to the page)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    code = "\n".join(line for line in lines if not line.startswith("//# sourceMappingURL="))
    for text in FORBIDDEN:
        if text in code:
            raise SystemExit(f"{path} contains {text!r}: it cannot be inlined into the DVC template")
    return f"<script>\n{code}\n</script>"


def build(out: Path) -> None:
    """Write the template to `out`."""
    missing = [name for name in LIBRARIES if not (NODE_MODULES / name).is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)} under {NODE_MODULES}: run `npm ci` at the repository root")
    scripts = "\n".join(library_script(NODE_MODULES / name) for name in LIBRARIES)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(PAGE.replace("<!-- libraries -->", scripts, 1), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where to write the template")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
