"""DVC stage windows: (context -> target) windows from the shards of --shards, split by whole documents or by
domain, written to --out as {train,val,test}.parquet + summary.json (moe_prefetch.windows.build).

    python -m stages.windows --shards data/shards --out data/windows
"""

from moe_prefetch.cli import run_stage, stage_arguments
from moe_prefetch.files import atomic_path
from moe_prefetch.windows.build import build_windows
from moe_prefetch.windows.config import WindowsParams


def main() -> None:
    params, args = stage_arguments("windows", WindowsParams, "Build (context -> target) windows from routing shards.", "shards", "out")
    with atomic_path(args.out) as temp:
        temp.mkdir()
        summary = build_windows(args.shards, temp, params)
    sizes = ", ".join(f"{name} {s['windows']} ({s['documents']} docs)" for name, s in summary["splits"].items())
    print(f"windows: {sizes}")


if __name__ == "__main__":
    run_stage(main)
