"""Throughput of each architecture: lungseg's training (Lightning + DataModule + metrics +
TensorBoard logging, through the same `train()` the CLI runs) against a bare PyTorch loop on the
same network, batches, loss and optimiser; inference; achieved GFLOP/s against a large matrix
product measured in the same process; peak memory; and the DataModule's own delivery rate.

    python benchmarks/throughput.py                                 # CPU, width 16, 128 px
    python benchmarks/throughput.py --width 64 --size 256 --batch 4 --models unet
    python benchmarks/throughput.py --channels-last --precision bf16-mixed
    python benchmarks/throughput.py --device cuda --precision bf16-mixed --size 512
    python benchmarks/throughput.py --augmentation device   # batches augmented on the device
    python benchmarks/throughput.py --return-freed-memory   # glibc's default (lungseg/hostmem.py)
    python benchmarks/throughput.py --fused-optimizer       # +optimizer.fused=true

Every rate is the median over --repeats; lungseg, the bare loop and the bare loop fed by the
DataModule's loader ("bare+loader") run back to back in each repeat (in rotating order), and
each ratio is the median of the repeats' ratios.
"""

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lungseg import hostmem  # noqa: E402
from lungseg.train import build_datamodule, plain, train  # noqa: E402


class StepTimer(pl.Callback):
    """Times training steps after `warmup` steps; the result lands in `StepTimer.seconds`."""

    seconds: list[float] = []

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup + self.steps:
            sync(pl_module.device)
            StepTimer.seconds.append(time.perf_counter() - self.start)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_cfg(args, model: str, workdir: Path):
    images = int((max(args.warmup, args.workers) + args.steps + 2) * args.batch / 0.6) + args.batch
    overrides = [
        f"model={model}",
        f"model.width={args.width}",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch}",
        f"data.demo_dir={workdir / 'demo'}",
        f"data.demo_num_images={images}",
        f"data.demo_size={max(args.size, 64)}",
        f"data.num_workers={args.workers}",
        f"augmentation={args.augmentation}",
        f"data.persistent_workers={args.workers > 0}",
        f"data.device_cache={args.device_cache}",
        # explicit: the bare loops' loader has no trainer to follow (data.pin_memory=null)
        f"data.pin_memory={args.device == 'cuda'}",
        f"output_dir={workdir / model}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.precision={args.precision}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.max_epochs=-1",
        "scheduler=none",  # no epoch count to plan a decay over; the bare loops have none
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        f"channels_last={args.channels_last}",
        f"compile={args.compile}",
        f"retain_freed_memory={not args.return_freed_memory}",
        "test_after_fit=false",
        "callbacks.model_checkpoint=null",
        "callbacks.last_checkpoint=null",
        "callbacks.early_stopping=null",
        "callbacks.prediction_grid=null",
        "+callbacks.timer._target_=__main__.StepTimer",
        f"+callbacks.timer.warmup={args.warmup}",
        f"+callbacks.timer.steps={args.steps}",
    ]
    if args.device == "cuda":
        overrides.append("trainer.benchmark=true")  # cudnn.benchmark, for the bare loop too
    if args.train_metrics_every is not None:
        overrides.append(f"train_metrics_every_n_steps={args.train_metrics_every}")
    if args.fused_optimizer:
        overrides.append("+optimizer.fused=true")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def lungseg_rate(cfg, args, repeat: int) -> float:
    StepTimer.seconds.clear()
    cfg = cfg.copy()
    cfg.output_dir = f"{cfg.output_dir}-{repeat}"  # lungseg never reuses a run folder
    train(cfg)
    return args.steps * args.batch / StepTimer.seconds[-1]


def build_bare(cfg, device, channels_last: bool):
    torch.manual_seed(cfg.seed)
    net = instantiate(plain(cfg.model)).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = instantiate(plain(cfg.optimizer), params=net.parameters())
    return net, optimizer, instantiate(plain(cfg.loss)).to(device)


def bare_step(net, optimizer, loss_fn, x, y, autocast):
    with autocast():
        loss = loss_fn(net(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def on_device(batch: dict, args, datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    """A DataModule batch as the bare loop takes it: (images, masks) on the device, augmented
    and normalised there with --augmentation device (as lungseg's on_after_batch_transfer)."""
    # non_blocking as Lightning copies: asynchronous from the pinned memory of a GPU run; with
    # --device-cache the batch is its indices, gathered on the device by device_transform
    batch = {
        key: value.to(args.device, non_blocking=True)
        for key, value in batch.items()
        if isinstance(value, torch.Tensor)
    }
    batch = datamodule.device_transform(batch)
    x = batch["image"]
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["mask"]


def bare_rate(net, optimizer, loss_fn, batches, args, autocast) -> float:
    """Training images/s of the bare loop over ``batches`` (an iterable of (images, masks)):
    ``args.warmup`` steps, then ``args.steps`` timed ones."""
    batches = iter(batches)
    for _ in range(args.warmup):
        bare_step(net, optimizer, loss_fn, *next(batches), autocast)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        bare_step(net, optimizer, loss_fn, *next(batches), autocast)
    sync(args.device)
    return args.steps * args.batch / (time.perf_counter() - start)


def bare_loader_rate(net, optimizer, loss_fn, datamodule, args, autocast) -> float:
    """The bare loop fed by the DataModule's training loader (augmentation on) instead of
    prepared tensors: what a hand-written loop with the same data would reach. lungseg against
    it is the cost of Lightning, metrics and logging alone."""
    fed = (on_device(batch, args, datamodule) for batch in datamodule.train_dataloader())
    return bare_rate(net, optimizer, loss_fn, fed, args, autocast)


@torch.no_grad()
def inference_rate(net, x, args, autocast) -> float:
    net.eval()
    for _ in range(args.warmup):  # under autocast too: a compiled network compiles for it here
        with autocast():
            net(x)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        with autocast():
            net(x)
    sync(args.device)
    net.train()
    return args.steps * x.shape[0] / (time.perf_counter() - start)


def train_flops_per_image(net, optimizer, loss_fn, x, y, autocast) -> float:
    with FlopCounterMode(display=False) as counter:
        bare_step(net, optimizer, loss_fn, x, y, autocast)
    return counter.get_total_flops() / x.shape[0]


def matmul_gflops(device, dtype, n: int, repeats: int = 5) -> float:
    """The best rate of an n x n x n matrix product in GFLOP/s (``gemm_rates``)."""
    return max(gemm_rates(device, dtype, n, repeats).values())


def gemm_rates(device, dtype, n: int, repeats: int = 5) -> dict[str, float]:
    """An n x n x n matrix product's GFLOP/s by each library that does one here: ``a @ b``
    (BLAS: MKL on the CPU, cuBLAS on a GPU) and, on the CPU, oneDNN's (the library the
    networks' convolutions run on). They differ: on an AMD EPYC with AVX-512 (2026-11-28) MKL
    reached 200 GFLOP/s in fp32 and oneDNN 455, and a U-Net's convolutions 330; against
    MKL's product alone they looked faster than the machine (130 %)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    products = {"BLAS": lambda: a @ b}
    if torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available():
        from torch.utils import mkldnn

        try:
            linear = torch.nn.Linear(n, n, bias=False)
            onednn = mkldnn.to_mkldnn(linear, dtype)  # weights in oneDNN's blocked layout
            rows = a.to_mkldnn()
            products["oneDNN"] = lambda: onednn(rows)
        except RuntimeError:  # e.g. bf16 on a CPU without AVX-512: BLAS's product alone
            pass
    rates = {}
    with torch.no_grad():
        for name, product in products.items():
            product()  # first call: kernel choice, memory
            best = float("inf")
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                product()
                sync(device)
                best = min(best, time.perf_counter() - start)
            rates[name] = 2 * n**3 / best / 1e9
    return rates


def data_rate(datamodule, args, warmup: int, batches: int) -> float:
    """Images/s the training loader delivers, augmented and on the device (with --augmentation
    device, augmented there), timed after its first ``warmup`` batches (worker start-up is a
    one-off cost, with persistent workers once per run)."""
    loader = (on_device(batch, args, datamodule) for batch in datamodule.train_dataloader())
    for _ in range(warmup):
        next(loader)
    sync(args.device)
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        seen += next(loader)[0].shape[0]
    sync(args.device)
    return seen / (time.perf_counter() - start)


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def add_run_arguments(parser: argparse.ArgumentParser, models: list[str]) -> None:
    """The arguments that say what trains (network, size, precision, loader), shared with
    benchmarks/profile_step.py."""
    parser.add_argument("--models", nargs="+", default=models)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument(
        "--augmentation", default="default", help="conf/augmentation/<name>: default, device"
    )
    parser.add_argument(
        "--device-cache",
        action="store_true",
        help="data.device_cache=true: training batches gathered from a copy of the data on the "
        "device (with --augmentation device)",
    )
    parser.add_argument(
        "--train-metrics-every", type=int, default=None, help="default: the config's"
    )
    parser.add_argument(
        "--fused-optimizer",
        action="store_true",
        help="+optimizer.fused=true: the optimiser's update in one kernel (lungseg's and the bare "
        "loops' optimiser alike)",
    )


def prepare_device(args: argparse.Namespace):
    """Exit where --device cuda has no GPU; cudnn's benchmark mode on a GPU. Returns a context
    factory for the bare loops' autocast (bf16 with --precision bf16-mixed)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: PyTorch sees no GPU on this machine")
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    bf16 = args.precision == "bf16-mixed"

    def autocast():
        return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16)

    return autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, ["unet", "fcn", "segnet", "deeplab"])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="leave glibc giving freed memory back to the OS (retain_freed_memory=false); "
        "the setting is the process's, so it holds for the bare loops too",
    )
    args = parser.parse_args()
    autocast = prepare_device(args)
    bf16 = args.precision == "bf16-mixed"
    dtype = torch.bfloat16 if bf16 else torch.float32

    retained = hostmem.configure(not args.return_freed_memory)
    n = 8192 if args.device == "cuda" else 2048  # large enough to reach each device's peak
    rates = gemm_rates(args.device, dtype, n)
    peak = max(rates.values())
    print(
        f"# device {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"width {args.width}, {args.size} px, batch {args.batch}, {args.precision}, "
        f"channels_last {args.channels_last}, compile {args.compile}, "
        f"augmentation {args.augmentation}, device cache {args.device_cache}, "
        f"{args.workers} workers, fused optimizer {args.fused_optimizer}, "
        f"freed memory retained {retained}, "
        f"{args.steps} timed steps x {args.repeats} repeats (median)"
    )
    print(
        f"# {'bf16' if bf16 else 'fp32'} matrix product ({n}^3): {peak:.1f} GFLOP/s (the better "
        f"of " + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()) + ")"
    )
    # A shared machine can be slow when the product is timed; each row's share is taken of the
    # best product measured so far, the start's or the one after that row's timings.
    header = (
        "| model | params (M) | lungseg train img/s | bare train img/s | ratio (range) "
        "| infer img/s | train GFLOP/img | lungseg GFLOP/s | % of matmul | peak MB "
        "| data img/s | data/train | bare+loader img/s | ratio to bare+loader |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            cfg = make_cfg(args, model, Path(tmp))
            datamodule = build_datamodule(cfg)
            batches = [
                on_device(batch, args, datamodule) for batch in datamodule.train_dataloader()
            ]
            assert len(batches) >= args.warmup + args.steps, "not enough batches"
            net, optimizer, loss_fn = build_bare(cfg, args.device, args.channels_last)
            if args.compile:
                net = torch.compile(net)
            if torch.device(args.device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ours, bare, fed = [], [], []
            for repeat in range(args.repeats):
                # Back to back in a rotating order, so that a slow spell of a shared machine
                # falls on every side of a ratio.
                for which in (repeat % 3, (repeat + 1) % 3, (repeat + 2) % 3):
                    if which == 0:
                        ours.append(lungseg_rate(cfg, args, repeat))
                    elif which == 1:
                        bare.append(bare_rate(net, optimizer, loss_fn, batches, args, autocast))
                    else:
                        rate = bare_loader_rate(net, optimizer, loss_fn, datamodule, args, autocast)
                        fed.append(rate)
            ratios = [o / b for o, b in zip(ours, bare, strict=True)]
            ratio = statistics.median(ratios)
            fed_ratio = statistics.median(o / f for o, f in zip(ours, fed, strict=True))
            infer = inference_rate(net, batches[0][0], args, autocast)
            flops = train_flops_per_image(net, optimizer, loss_fn, *batches[0], autocast)
            delivered = data_rate(datamodule, args, max(args.warmup, args.workers), args.steps)
            ours_rate, bare_rate_ = statistics.median(ours), statistics.median(bare)
            achieved = flops * ours_rate / 1e9
            params = sum(p.numel() for p in net.parameters()) / 1e6
            memory = peak_memory_mb(args.device)
            peak = max(peak, matmul_gflops(args.device, dtype, n))
            print(
                f"| {model} | {params:.2f} | {ours_rate:.2f} | {bare_rate_:.2f} "
                f"| {ratio:.3f} ({min(ratios):.2f}-{max(ratios):.2f}) | {infer:.2f} "
                f"| {flops / 1e9:.2f} "
                f"| {achieved:.1f} | {100 * achieved / peak:.0f}% | {memory:.0f} "
                f"| {delivered:.0f} | {delivered / ours_rate:.0f}x "
                f"| {statistics.median(fed):.2f} | {fed_ratio:.3f} |",
                flush=True,
            )
    print(f"# best matrix product of the run: {peak:.1f} GFLOP/s")
    if torch.device(args.device).type != "cuda":
        print(
            "# peak MB on the CPU: the process's peak resident memory so far (it cannot be "
            "reset between rows), so a row never shows less than the rows before it; "
            "--models <name> alone gives one network's"
        )


if __name__ == "__main__":
    main()
