"""``python -m mvloss info`` (versions, devices, backends) and ``python -m mvloss demo`` (the main job)."""
from __future__ import annotations

import argparse
import platform
import sys


def info() -> int:
    import torch

    import mvloss

    print(f"mvloss {mvloss.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as exc:  # triton is optional
        print(f"triton: not importable ({exc})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print(f"device: cpu only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print("backends (auto picks the first available, top to bottom):")
    for b in mvloss.backends():
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        print(f"  {b['name']:<10} {state}")
    from .backends import cpp

    cpu_kernels = cpp.cpu_kernels()
    if cpu_kernels is not None:
        print(f"cpu backend: {cpu_kernels}")
    from .triton import _config

    try:
        settings = (f"forward {_config.forward_mode()}, recompute kernel {_config.dlogits_mode()}, backward "
                    f"{_config.backward_mode()}, fp32 products {_config.fp32_precision()}")
    except ValueError as exc:  # a misspelt environment variable: say which
        settings = str(exc)
    print(f"triton settings: {settings}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvloss")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and backends")
    demo = sub.add_parser("demo", help="train heads on real data, verification metrics, plots, scale step")
    demo.add_argument("--device", default=None)
    demo.add_argument("--quick", action="store_true")
    demo.add_argument("--out", default="demo_out")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info()
    from . import demo as demo_module

    return demo_module.main(args, rest)


if __name__ == "__main__":
    sys.exit(main())
