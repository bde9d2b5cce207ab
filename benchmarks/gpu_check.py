"""The GPU check: one command that tells, in a few minutes, whether robustkit is right and fast on a GPU.

    python benchmarks/gpu_check.py --prepare .gpu                 # here, once: what the GPU machine lacks
    python benchmarks/gpu_check.py --data .gpu --device cuda      # on the GPU machine (< 8 minutes, one H100)
    python benchmarks/gpu_check.py --data .gpu --device cpu --quick   # the test suite runs this on the CPU

``--prepare DIR`` copies into DIR (git-ignored ``.gpu/``; name it in the device tool's ``carry``)
the CIFAR-10 images and checkpoints of ../shared/data, pyautoattack's example ResNet-18 and the
sources of the oracles torchattacks and pyautoattack: the GPU machine has no ../shared and no pip.
There, robustkit is imported from this checkout (no install needed).

The check, each part a few rows of one table (printed, and written to ``--output``,
default benchmarks/results/gpu.md unless ``--quick``):

1. every registered attack, Linf and L2 where supported, on real CIFAR-10 images and a real
   checkpoint (ResNet-20): no exception, points inside the ball and [0, 1], success equal to an
   fp32 recheck of the returned points;
2. the deterministic attacks (FGSM, PGD without random start, FAB-T) on CPU and on the device:
   per-sample agreement >= 99% and robust accuracy within 0.5 pp; the same seed twice on the
   device gives identical points;
3. fp16 and bf16 autocast against fp32 (PGD, APGD-CE, AutoAttack standard) on an adversarially
   trained model: robust accuracy within 1 pp (one image on very small runs);
4. one training epoch (fp16 on CUDA / bf16 on CPU, channels_last, CutMix) and one DAT epoch with
   one worker;
5. timing on 1,000 images (``--n-time``), ResNet-18 (pyautoattack's checkpoint) and WRN-28-10
   (random weights): PGD-10 against a bare 10 x (forward + backward) loop and torchattacks;
   APGD-CE and AutoAttack standard against pyautoattack (robust accuracy, agreement, time ratio).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODEL_FILES = {"resnet20": "resnet20-12fca82f.th", "resnet4b": "abcrown_resnet4b.pth"}
ORACLES = ("torchattacks", "pyautoattack")


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Imports robustkit from this checkout where it is not installed (the GPU machine has no pip):
    ``robustkit.attacks`` and ``robustkit.defenses`` live in the top-level plug-in folders."""

    folders = {"robustkit.attacks": ROOT / "attacks", "robustkit.defenses": ROOT / "defenses"}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def use_checkout() -> None:
    if importlib.util.find_spec("robustkit") is None:
        sys.path.insert(0, str(ROOT))
        sys.meta_path.insert(0, _CheckoutFinder())


# -- prepare ----------------------------------------------------------------------------------------


def prepare(folder: Path) -> None:
    """Copy what the GPU machine needs into ``folder``."""
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "site").mkdir(exist_ok=True)
    for name in ("cifar10_test1000.npz", "cifar10_train1000.npz"):
        shutil.copy2(SHARED / name, folder / name)
    for file in MODEL_FILES.values():
        shutil.copy2(SHARED / "models" / file, folder / "models" / file)
    for package in ORACLES:
        source = Path(importlib.util.find_spec(package).origin).parent
        shutil.rmtree(folder / "site" / package, ignore_errors=True)
        shutil.copytree(source, folder / "site" / package,
                        ignore=shutil.ignore_patterns("__pycache__", "examples", "*.pt"))
    example = Path(importlib.util.find_spec("pyautoattack").origin).parent / "examples" / "model_test.pt"
    shutil.copy2(example, folder / "models" / "model_test.pt")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"Prepared {folder} ({size / 2**20:.1f} MiB): images, checkpoints, {', '.join(ORACLES)}.")


# -- the table ----------------------------------------------------------------------------------------


@dataclass
class Row:
    part: str
    check: str
    value: str
    target: str
    ok: bool | None  # None: measured, no pass/fail (timings)


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, part: str, check: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append(Row(part, check, value, target, ok))
        mark = "" if ok is None else "ok" if ok else "FAIL"
        print(f"  [{part}] {check}: {value} {f'(target {target})' if target else ''} {mark}", flush=True)

    def guard(self, part: str, check: str, fn: Callable[[], None]) -> None:
        """Run one check; an exception is a failed row, not the end of the whole check."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (a crash is a result here)
            traceback.print_exc()
            self.add(part, check, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}", "", False)

    def markdown(self, header: str) -> str:
        lines = [header, "", "| part | check | value | target | status |", "|---|---|---|---|---|"]
        for r in self.rows:
            status = "" if r.ok is None else "ok" if r.ok else "**FAIL**"
            lines.append(f"| {r.part} | {r.check} | {r.value} | {r.target} | {status} |")
        failed = sum(r.ok is False for r in self.rows)
        lines += ["", f"{failed} failed of {sum(r.ok is not None for r in self.rows)} checks."]
        return "\n".join(lines) + "\n"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of ``fn()`` with the device's queue drained before and after, and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def pct(mask: torch.Tensor) -> float:
    return 100 * float(mask.float().mean()) if mask.numel() else float("nan")


# -- the check ----------------------------------------------------------------------------------------


class Check:
    def __init__(self, args: argparse.Namespace):
        from robustkit.models import load_model

        self.args = args
        self.quick = args.quick
        self.device = torch.device(args.device)
        self.data = Path(args.data)
        self.report = Report()
        self.load_model = load_model
        n = 8 if self.quick else args.n
        self.x, self.y = self.images(n)

    def images(self, n: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        with np.load(self.data / f"cifar10_{split}1000.npz") as f:
            x = torch.from_numpy(f["x"][:n]).permute(0, 3, 1, 2).float().div(255).contiguous()
            y = torch.from_numpy(f["y"][:n]).long()
        return x.to(self.device), y.to(self.device)

    def model(self, name: str, device: torch.device | None = None) -> torch.nn.Module:
        return self.load_model(name, self.data / "models" / MODEL_FILES[name]).eval().to(device or self.device)

    def budget(self, cls: type) -> dict[str, Any]:
        """Small budgets under --quick; the attacks' defaults otherwise."""
        from robustkit.evaluation.attack_spec import option_hints

        hints = option_hints(cls) or {}
        if not self.quick:  # the defaults, but C&W's 9 x 10,000 steps would take the whole check
            return {"binary_search_steps": 5, "steps": 200} if "binary_search_steps" in hints else {}
        small = {"steps": 3, "n_queries": 30, "apgdt_steps": 3, "n_iter": 3}
        options = {k: v for k, v in small.items() if k in hints}
        if "version" in hints:  # AutoAttack: small stages
            options["stage_options"] = {s: {"steps": 3} for s in ("apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t")}
            options["stage_options"]["square"] = {"n_queries": 30}
        return options

    # 1. every attack
    def attacks(self) -> None:
        import robustkit.attacks  # noqa: F401  (registers the attacks)
        from robustkit import ThreatModel
        from robustkit.registry import ATTACKS

        net = self.model("resnet20")
        for name in ATTACKS.names():
            cls = ATTACKS.get(name)
            if name in ("torchattacks", "pyautoattack"):
                continue  # the oracles: parts 2-5 run them
            for threat in (ThreatModel("linf", 8 / 255), ThreatModel("l2", 0.5)):
                if threat.norm not in cls.supported_norms:
                    continue
                self.report.guard("attacks", f"{name} {threat.norm}",
                                  lambda cls=cls, name=name, threat=threat: self._one_attack(net, name, cls, threat))

    def _one_attack(self, net: torch.nn.Module, name: str, cls: type, threat: Any) -> None:
        attack = cls(threat, seed=0, **self.budget(cls))
        seconds, res = timed(lambda: attack(net, self.x, self.y), self.device)
        with torch.no_grad():
            recheck = net(res.x_adv).float().argmax(1) != self.y
        inside = bool((threat.norm_of(res.x_adv - self.x) <= threat.eps * (1 + 1e-5) + 1e-6).all())
        in_box = bool(((res.x_adv >= 0) & (res.x_adv <= 1)).all())
        same = torch.equal(recheck, res.success.to(recheck.device))
        self.report.add("attacks", f"{name} {threat.norm}",
                        f"robust {pct(~res.success):.1f}%, {seconds:.1f} s; ball {inside}, box {in_box}, "
                        f"success = fp32 recheck {same}", "all true", inside and in_box and same)

    # 2. CPU against the device, and the same seed twice
    def determinism(self) -> None:
        from robustkit import ThreatModel
        from robustkit.attacks import FABT, FGSM, PGD

        threat = ThreatModel("linf", 2 / 255)
        steps = 3 if self.quick else 10
        cases = {"fgsm": lambda: FGSM(threat), "pgd (no random start)": lambda: PGD(threat, steps=steps,
                                                                                    random_start=False),
                 "fab-t": lambda: FABT(threat, steps=steps, seed=0)}
        cpu = torch.device("cpu")
        for label, make in cases.items():
            def one(label: str = label, make: Callable[[], Any] = make) -> None:
                net = self.model("resnet20")
                first = make()(net, self.x, self.y)
                again = make()(net, self.x, self.y)
                self.report.add("determinism", f"{label}: same seed twice on {self.device.type}",
                                f"identical points {torch.equal(first.x_adv, again.x_adv)}", "true",
                                torch.equal(first.x_adv, again.x_adv) and torch.equal(first.success, again.success))
                if self.device.type == "cpu":
                    return
                on_cpu = make()(self.model("resnet20", cpu), self.x.cpu(), self.y.cpu())
                agree = pct(on_cpu.success == first.success.cpu())
                gap = abs(pct(~on_cpu.success) - pct(~first.success.cpu()))
                self.report.add("determinism", f"{label}: CPU vs {self.device.type}",
                                f"agreement {agree:.1f}%, robust {pct(~on_cpu.success):.1f}% vs "
                                f"{pct(~first.success.cpu()):.1f}%", ">= 99%, <= 0.5 pp", agree >= 99 and gap <= 0.5)
            self.report.guard("determinism", label, one)

    # 3. mixed precision
    def precision(self) -> None:
        from robustkit import ThreatModel
        from robustkit.attacks import APGD, PGD, AutoAttack

        tolerance = max(1.0, 100 / len(self.y))  # one image on very small runs
        settings = [("resnet20", 2 / 255)] + ([] if self.quick else [("resnet4b", 8 / 255)])
        for model, eps in settings:  # resnet20 at 2/255: where unscaled fp16 gradients reported 46.9% for 3.1%
            net, threat = self.model(model), ThreatModel("linf", eps)
            cases = {"pgd-10": lambda threat=threat, **kw: PGD(threat, steps=3 if self.quick else 10, seed=0, **kw),
                     "apgd-ce": lambda threat=threat, **kw: APGD(threat, steps=3 if self.quick else 100, seed=0, **kw),
                     "autoattack": lambda threat=threat, **kw: AutoAttack(threat, seed=0, **self.budget(AutoAttack),
                                                                          **kw)}
            for label, make in cases.items():
                def one(label: str = label, make: Callable[..., Any] = make, net: Any = net, model: str = model,
                        eps: float = eps) -> None:
                    base = make()(net, self.x, self.y)
                    for precision in ("bf16", "fp16"):
                        res = make(autocast=precision)(net, self.x, self.y)
                        gap = abs(pct(~res.success) - pct(~base.success))
                        self.report.add("precision", f"{label} {precision} vs fp32 ({model}, {eps * 255:.0f}/255)",
                                        f"robust {pct(~res.success):.1f}% vs {pct(~base.success):.1f}%",
                                        f"<= {tolerance:.1f} pp", gap <= tolerance)
                self.report.guard("precision", f"{label} {model}", one)

    # 4. training
    def training(self) -> None:
        from robustkit.training.dat import DATConfig, train_dat
        from robustkit.training.loop import TrainConfig, train

        n = 64 if self.quick else 1000
        common = {"model": "resnet20", "dataset": f"npz:{self.data / 'cifar10_train1000.npz'}", "n_examples": n,
                  "val_dataset": f"npz:{self.data / 'cifar10_test1000.npz'}", "val_size": 32 if self.quick else 256,
                  "eps": 8 / 255, "epochs": 1, "batch_size": 32 if self.quick else 128, "device": str(self.device),
                  "attack_steps": 2, "warmup_epochs": 0.0}
        precision = "fp16" if self.device.type == "cuda" else "bf16"

        def standard() -> None:
            seconds, res = timed(lambda: train(TrainConfig(method="pgd-at", autocast=precision, channels_last=True,
                                                           mix="cutmix", **common)), self.device)
            last = res.history[-1]
            ok = bool(np.isfinite(last.get("loss", float("nan"))))
            self.report.add("training", f"pgd-at 1 epoch, {precision}, channels_last, cutmix ({n} images)",
                            f"loss {last.get('loss', float('nan')):.3f}, {seconds:.1f} s", "finite loss", ok)

        def dat() -> None:
            seconds, res = timed(lambda: train_dat(DATConfig(**common)), self.device)
            last = res.history[-1]
            ok = bool(np.isfinite(last.get("loss", float("nan")))) and last.get("world_size") == 1
            self.report.add("training", f"dat 1 epoch, one worker ({n} images)",
                            f"loss {last.get('loss', float('nan')):.3f}, {seconds:.1f} s", "finite loss", ok)

        self.report.guard("training", "pgd-at", standard)
        self.report.guard("training", "dat", dat)

    # 5. timing against the peers
    def timing(self) -> None:
        n = 16 if self.quick else self.args.n_time
        x, y = self.images(n)

        def resnet18() -> torch.nn.Module:
            return self.load_model("resnet18", self.data / "models" / "model_test.pt", normalize=None).eval()

        def wrn() -> torch.nn.Module:
            torch.manual_seed(0)
            return self.load_model("wrn-28-10" if not self.quick else "resnet20").eval()

        for label, make in (("resnet18 (pyautoattack's)", resnet18), ("wrn-28-10 (random)", wrn)):
            def one(label: str = label, make: Callable[[], torch.nn.Module] = make) -> None:
                net = make().to(self.device)
                if "random" in label:  # its own predictions as labels, so that every point is attacked
                    with torch.no_grad():
                        labels = torch.cat([net(part).argmax(1) for part in x.split(250)])
                self._time_model(label, net, x, labels if "random" in label else y)
            self.report.guard("timing", label, one)

    def _time_model(self, label: str, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        import torchattacks
        from pyautoattack import AutoAttack as PyAA

        from robustkit import ThreatModel
        from robustkit.attacks import APGD, PGD, AutoAttack

        eps, steps = 8 / 255, 3 if self.quick else 10
        threat = ThreatModel("linf", eps)
        alpha = eps / 4

        def bare() -> torch.Tensor:  # the floor: k x (forward + backward), no attack logic
            xa = x.clone()
            for _ in range(steps):
                xa.requires_grad_(True)
                loss = torch.nn.functional.cross_entropy(net(xa), y)
                (g,) = torch.autograd.grad(loss, xa)
                xa = (xa.detach() + alpha * g.sign()).clamp(0, 1)
            return xa

        def robust(adv: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return net(adv).argmax(1) == y

        timed(lambda: bare(), self.device)  # warm-up (cuDNN autotuning, allocator)
        t_bare, _ = timed(bare, self.device)
        ours = PGD(threat, steps=steps, step_size=alpha, random_start=False, early_stop=False)
        t_rk, res = timed(lambda: ours(net, x, y), self.device)
        ta = torchattacks.PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=False)
        t_ta, adv = timed(lambda: ta(x, y), self.device)
        self.report.add("timing", f"{label}: PGD-{steps}, {len(y)} images",
                        f"robustkit {t_rk:.2f} s (robust {pct(~res.success):.1f}%), bare loop {t_bare:.2f} s, "
                        f"torchattacks {t_ta:.2f} s (robust {pct(robust(adv)):.1f}%); robustkit/bare "
                        f"{t_rk / t_bare:.2f}x, torchattacks/robustkit {t_ta / t_rk:.2f}x")
        apgd_steps = 3 if self.quick else 100
        ours_apgd = APGD(threat, steps=apgd_steps, seed=0)
        t_rk, res = timed(lambda: ours_apgd(net, x, y), self.device)
        peer = PyAA(net, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce"], seed=0, device=self.device)
        peer.apgd.n_iter, peer.apgd.n_restarts, peer.verbose = apgd_steps, 1, False
        t_aa, adv = timed(lambda: peer.run_standard_evaluation(x, y, batch_size=len(y))[0], self.device)
        agree = pct((~res.success) == robust(adv))
        self.report.add("timing", f"{label}: APGD-CE-{apgd_steps}, {len(y)} images",
                        f"robustkit {t_rk:.2f} s, pyautoattack {t_aa:.2f} s: {t_aa / t_rk:.2f}x; robust "
                        f"{pct(~res.success):.1f}% vs {pct(robust(adv)):.1f}%, agreement {agree:.1f}%")
        aa = AutoAttack(threat, seed=0, **self.budget(AutoAttack))
        t_rk, res = timed(lambda: aa(net, x, y), self.device)
        peer = PyAA(net, norm="Linf", eps=eps, version="standard", seed=0, device=self.device)
        peer.verbose = False
        if self.quick:
            peer.apgd.n_iter = peer.apgd_targeted.n_iter = peer.fab.n_iter = 3
            peer.square.n_queries = 30
        t_aa, adv = timed(lambda: peer.run_standard_evaluation(x, y, batch_size=len(y))[0], self.device)
        agree = pct((~res.success) == robust(adv))
        self.report.add("timing", f"{label}: AutoAttack standard, {len(y)} images",
                        f"robustkit {t_rk:.2f} s, pyautoattack {t_aa:.2f} s: {t_aa / t_rk:.2f}x; robust "
                        f"{pct(~res.success):.1f}% vs {pct(robust(adv)):.1f}%, agreement {agree:.1f}%",
                        "agreement >= 99%" if not self.quick else "", agree >= 99 if not self.quick else None)

    def run(self) -> Report:
        for part in (self.attacks, self.determinism, self.precision, self.training, self.timing):
            print(f"== {part.__name__}", flush=True)
            part()
        return self.report


def machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return f"{platform.processor() or platform.machine()}, {gpu}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--prepare", type=Path, metavar="DIR", help="copy what the GPU machine needs into DIR")
    parser.add_argument("--data", type=Path, default=ROOT / ".gpu", help="a folder made by --prepare")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's CPU run)")
    parser.add_argument("--n", type=int, default=64, help="images of parts 1-3")
    parser.add_argument("--n-time", type=int, default=1000, help="images of part 5")
    parser.add_argument("--output", type=Path, help="[default: benchmarks/results/gpu.md, none with --quick]")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return 0
    if not (args.data / "cifar10_test1000.npz").exists():
        parser.error(f"{args.data} has no prepared data; run `python benchmarks/gpu_check.py --prepare {args.data}` "
                     "first (it reads ../shared/data).")
    sys.path.insert(0, str(args.data / "site"))  # the oracles' sources, where pip is not available
    use_checkout()
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    from robustkit.determinism import deterministic_cuda  # after use_checkout: robustkit may come from here

    if args.device.startswith("cuda"):
        deterministic_cuda()
    started = time.perf_counter()
    report = Check(args).run()
    header = (f"# GPU check\n\n`python benchmarks/gpu_check.py --data {args.data} --device {args.device}"
              f"{' --quick' if args.quick else ''}` on {machine(torch.device(args.device))}; "
              f"{time.perf_counter() - started:.0f} s in all.")
    text = report.markdown(header)
    print("\n" + text)
    output = args.output or (None if args.quick else ROOT / "benchmarks" / "results" / "gpu.md")
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    return 1 if any(r.ok is False for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
