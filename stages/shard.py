"""DVC stage shard: merge the trace chunks of --traces into Parquet shards + manifest.json in --out
(moe_prefetch.sharding).

    python -m stages.shard --traces data/traces --out data/shards
"""

from moe_prefetch.cli import run_stage, stage_arguments
from moe_prefetch.files import atomic_path
from moe_prefetch.sharding import ShardParams, write_shards


def main() -> None:
    params, args = stage_arguments("shard", ShardParams, "Merge trace chunks into Parquet shards with a manifest.", "traces", "out")
    with atomic_path(args.out) as temp:
        temp.mkdir()
        manifest = write_shards(args.traces, temp, params)
    print(f"shard: {manifest.rows} token rows in {len(manifest.shards)} shards -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
