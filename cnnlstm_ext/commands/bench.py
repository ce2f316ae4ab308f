"""Time a full training step of the fused model against the stock one, in the same run.

A step is forward (bf16 autocast on GPUs), cross-entropy, backward, gradient clipping and AdamW,
as the trainer runs it. Fused: CNNLSTM(fused=True) (FusedBiLSTM and the fused pooling ops). Stock:
the same model and weights with torch.nn.LSTM and plain-PyTorch pooling. The two alternate round
by round; the figure is clips per second of the median round, and the ratio fused/stock.

Default model: CNNLSTM() (ResNet-18 -> 3-layer BiLSTM 512 -> mean -> 100 classes). Default shape:
B=32, T=32, 112x112 on a GPU; B=4, T=8, 112x112 on the CPU (the GPU shape takes minutes per step
there). For the main job's small model: --set model.backbone=tiny --set model.spatial_dim=64 ...

    cnnlstm-ext bench                       # GPU if present, else CPU
    cnnlstm-ext bench --device cpu --batch-size 8 --frames 16 --json cpu.json
"""
import json
import sys


def add_arguments(parser):
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto (default): bf16 autocast on GPUs, fp32 on the CPU")
    parser.add_argument("--batch-size", type=int, metavar="B", help="clips per step")
    parser.add_argument("--frames", type=int, metavar="T", help="frames per clip")
    parser.add_argument("--size", type=int, metavar="S", help="frame height and width")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="steps per timed round (default: 10 on a GPU, 2 on the CPU)")
    parser.add_argument("--rounds", type=int, default=3, metavar="N",
                        help="timed rounds per variant (default 3; the median counts)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="model.KEY=VALUE", help="a CNNLSTM argument, e.g. model.num_layers=2")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")


def run(args) -> int:
    from ..train.config import parse_override
    from ..train.distributed import DistContext
    from ..train.step_benchmark import CPU_SHAPE, GPU_SHAPE, compare_train_step
    from ..train.trainer import resolve_device, resolve_precision

    model_config = {}
    try:
        for item in args.overrides:
            section, key, value = parse_override(item)
            if section != "model":
                raise ValueError("bench takes only model.* overrides, got %r" % item)
            model_config[key] = value
        device = resolve_device(args.device, DistContext())
    except (ValueError, RuntimeError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    amp_dtype = resolve_precision(args.precision, device)
    shape = dict(GPU_SHAPE if device.type == "cuda" else CPU_SHAPE)
    for key, value in (("batch", args.batch_size), ("frames", args.frames), ("size", args.size)):
        if value is not None:
            shape[key] = value
    steps = args.steps or (10 if device.type == "cuda" else 2)
    try:
        r = compare_train_step(model_config, shape["batch"], shape["frames"], shape["size"], device,
                               amp_dtype, steps=steps, rounds=args.rounds)
    except (ValueError, TypeError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    print("training step, B=%d T=%d %dx%d %s on %s, %s parameters (median of %d rounds x %d steps)"
          % (r["batch"], r["frames"], r["size"], r["size"], r["dtype"], r["device"],
             format(r["parameters"], ","), r["rounds"], r["steps_per_round"]))
    print("  stock (nn.LSTM, PyTorch pooling)  %8.1f ms/step  %8.1f clips/s"
          % (r["stock_step_s"] * 1e3, r["stock_clips_per_s"]))
    print("  fused (cnnlstm_ext)               %8.1f ms/step  %8.1f clips/s"
          % (r["fused_step_s"] * 1e3, r["fused_clips_per_s"]))
    print("  fused / stock                     %8.2fx" % r["speedup"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
            f.write("\n")
    return 0
