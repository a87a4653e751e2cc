"""DVC stage train: fit the predictor named by train.arch on the windows of --windows; write the checkpoint to
--out and DVCLive logs to --live (moe_prefetch.training).

    python -m stages.train --windows data/windows --out data/predictor --live dvclive
    accelerate launch --multi_gpu --num_processes 2 -m stages.train ...   # DDP (train.launcher); on CPU: 2 gloo processes

Under a distributed launcher every process trains, and only the main process writes the checkpoint and logs.
"""

from moe_prefetch.cli import run_stage, stage_arguments
from moe_prefetch.files import atomic_path
from moe_prefetch.predictors.neural import on_cpu
from moe_prefetch.training import TrainParams, train


def main() -> None:
    from accelerate import PartialState

    params, args = stage_arguments("train", TrainParams, "Train the expert predictor named by train.arch.", "windows", "out", "live")
    state = PartialState(cpu=on_cpu(params.device))  # one process, or this process's rank under `accelerate launch`
    if not state.is_main_process:
        train(params, args.windows, None, None)
        return
    with atomic_path(args.out) as out, atomic_path(args.live) as live_dir:
        final = train(params, args.windows, out, live_dir)
    print(f"train: {params.arch}: {final}")


if __name__ == "__main__":
    run_stage(main)
