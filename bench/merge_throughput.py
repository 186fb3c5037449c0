"""Candidate materialization: memory and throughput on a synthetic model, in both worker modes, in one run.

    python bench/merge_throughput.py [--params 120e6] [--parents 3] [--dtype bfloat16] [--modes resident,streaming]
    python bench/merge_throughput.py --device cuda --shape mistral-7b --root /dev/shm --methods task_arithmetic,ties,dare_ties

The second form is the device check: a Mistral-7B-shaped model (7.24B params) built on the device in seconds, and
per line also the device's bytes/param (allocated after the first candidate, and its peak).

Builds a Llama-shaped model of random weights in `--dtype` in a temp dir (no downloads): base + parents, each parent
the base plus small noise.  Then, for each mode, it loads the parents as a study's worker does (``resident``: copied
at their stored size; ``streaming``: mapped from the files) and measures:

* memory, one fresh process per method (a worker runs one method: its own baseline, and no other method's kernels
  or index) — RssAnon (anonymous memory: the mapped parents' file pages are not counted) above the process's
  baseline before loading, per parameter: after the method's first candidate (``resident_bytes_per_param``) and the
  peak since loading began, sampled every millisecond and at least the value after that candidate
  (``peak_bytes_per_param``);
* time, in one more process, best of several round-robin repeats — ``copy`` (``target.copy_(base)`` for every tensor
  at the stored dtype: one read + one write of the model, the floor), then ``Materializer.materialize`` of a
  per-layer recipe for task_arithmetic, ties, dare_ties and della.

Bandwidth counts the bytes each must move at least at the stored dtype (copy: 2 × model; a merge of N parents:
(N + 2) × model — N parents and the base read, the model written), so "≥ 0.5× copy bandwidth" means the merge streams
memory at half the rate a plain copy does or better.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

# isort: off
import evomerge  # noqa: F401  (before torch, as in a worker: it sets how OpenMP threads wait)
import torch
# isort: on

METHODS = (("task_arithmetic", False), ("ties", True), ("dare_ties", True), ("della", True))
DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16")}


def llama_config(shape: str, params: float, dtype: str) -> dict:
    """`llama`: hidden 1024, as many layers as make `params`; `mistral-7b`: Mistral-7B's shapes (7.24B params)."""
    if shape == "mistral-7b":
        hidden, inter, vocab, layers, heads, kv = 4096, 14336, 32000, 32, 32, 8
    else:
        hidden, inter, vocab, heads, kv = 1024, 2816, 32000, 16, 16
        layers = max(1, round((params - 2 * vocab * hidden) / (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "dtype": dtype}


def build(root: Path, config: dict, parents: int, device: str) -> tuple[str, list[str]]:
    """Base + parents (each the base plus small noise), one tensor at a time, drawn on `device` (a GPU draws 7B
    parameters in seconds) and saved in the config's dtype."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(LlamaConfig(**config)).state_dict().items()}
    paths = []
    for i, name in enumerate(["base"] + [f"p{j}" for j in range(parents)]):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        sd = {}
        for k, s in shapes.items():  # one tensor in fp32 at a time: the builder must not need the model in fp32
            seed = zlib.crc32(k.encode())
            t = torch.randn(s, device=device, generator=torch.Generator(device).manual_seed(seed)) * 0.02
            if i:
                t += torch.randn(s, device=device, generator=torch.Generator(device).manual_seed(seed + i)) * 0.002
            sd[k] = t.to(DTYPES[config["dtype"]]).cpu()
        save_file(sd, d / "model.safetensors")
        del sd
        paths.append(str(d))
    return paths[0], paths[1:]


def child(args: argparse.Namespace) -> None:
    """One mode in this process: with `--timing`, the methods' times as JSON on the last line; without, the memory
    line of each method (one, in the parent's use)."""
    from evomerge.merge import Materializer
    from evomerge.merge.plan import AnonPeak, rss_anon
    from evomerge.recipe import Recipe

    torch.ones(4) + torch.ones(4)
    if not args.eager:  # the compiler's own code and caches are the process's, not the model's: load them first
        torch.compile(lambda x: x * 2, dynamic=True)(torch.ones(8))
    parents = args.parent_paths.split(",")
    cuda = args.device.startswith("cuda")
    methods = [(m, d) for m, d in METHODS if m in args.methods.split(",")]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    baseline = rss_anon()
    with AnonPeak() as peak:
        t0 = time.perf_counter()
        mat = Materializer(args.base, parents, args.device, compile=False if args.eager else None, mode=args.mode)
        load_s = time.perf_counter() - t0
        n_params = sum(t.numel() for t in mat.store.models[0].values())
        n = len(parents)
        rng = torch.Generator().manual_seed(1)

        def recipe(method: str, density: bool) -> Recipe:
            groups = {}
            for g in mat.groups:
                values = {"weight": (0.3 + 0.7 * torch.rand(n, generator=rng)).tolist()}
                if density:
                    values["density"] = (0.2 + 0.6 * torch.rand(n, generator=rng)).tolist()
                if method == "della":
                    values["epsilon"] = [0.1] * n
                groups[g] = values
            return Recipe(method, mat.parent_paths, groups, mat.base_path, seed=3, dtype=mat.dtype)

        if args.timing:
            print(f"mode {args.mode}: {n_params / 1e6:.0f}M params {mat.dtype}, {n} parents + base; threads "
                  f"{torch.get_num_threads()}; compile {mat.compile}; load {load_s:.1f} s", flush=True)
        runs: dict[str, Callable[[], object]] = {}
        for method, density in methods:
            t0 = time.perf_counter()
            mat.materialize(recipe(method, density))
            sync()
            first = time.perf_counter() - t0
            now = rss_anon()
            resident = (now - baseline) / n_params
            device = (f" device_bytes_per_param={torch.cuda.memory_allocated() / n_params:.2f}"
                      f" device_peak_bytes_per_param={torch.cuda.max_memory_allocated() / n_params:.2f}" if cuda else "")
            if not args.timing:
                print(f"mode={args.mode} method={method} resident_bytes_per_param={resident:.2f} "
                      f"peak_bytes_per_param={(max(peak.peak, now) - baseline) / n_params:.2f}{device}  (first call {first:.1f} "
                      "s)", flush=True)
            runs[method] = lambda m=method, d=density: mat.materialize(recipe(m, d))
    if not args.timing:
        return
    sources = list(mat.store.models[0].values())
    targets = [mat._targets[k] for k in mat.store.models[0]]

    def copy() -> None:
        for t, b in zip(targets, sources):
            t.copy_(b)

    runs = {"copy": copy, **runs}
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):  # round-robin, so a burst of load on a shared machine hits every entry alike
        for k, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[k] = min(best[k], time.perf_counter() - t0)
    model_bytes = n_params * sources[0].element_size()
    print(json.dumps({"best": best, "model_bytes": model_bytes, "n": n, "methods": [m for m, _ in methods]}))


def report(mode: str, best: dict[str, float], model_bytes: int, n: int, methods: list[str]) -> None:
    """Streaming on CUDA: the copy reads the mapped file, so its bandwidth is the host-to-device bound."""
    copy_s = best["copy"]
    copy_bw = 2 * model_bytes / copy_s
    print(f"mode={mode} {'copy':<16} {copy_s:7.3f} s  {copy_bw / 1e9:6.1f} GB/s")
    for method in methods:
        s = best[method]
        bw = (n + 2) * model_bytes / s
        print(f"mode={mode} {method:<16} {s:7.3f} s  {bw / 1e9:6.1f} GB/s = {bw / copy_bw:4.2f}x copy bandwidth  "
              f"({s / best['task_arithmetic']:4.2f}x task_arithmetic time)")
    ta = best["task_arithmetic"]
    ta_ratio = ((n + 2) * model_bytes / ta) / copy_bw
    others = [m for m in methods if m != "task_arithmetic"]
    worst = max((best[m] for m in others), default=ta) / ta
    print(f"mode={mode} acceptance: task_arithmetic {ta_ratio:.2f}x copy bandwidth (>= 0.5: "
          f"{'PASS' if ta_ratio >= 0.5 else 'FAIL'}); " + ", ".join(
              f"{m} {best[m] / ta:.2f}x" for m in others) + f" task_arithmetic time (<= 2: "
          f"{'PASS' if worst <= 2 else 'FAIL'})\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=120e6)
    ap.add_argument("--shape", choices=["llama", "mistral-7b"], default="llama")
    ap.add_argument("--device", default="cpu", help="where the worker merges (cpu, cuda)")
    ap.add_argument("--root", help="where to build the models (default: a temp dir; /dev/shm for 7B on a GPU box)")
    ap.add_argument("--methods", default=",".join(m for m, _ in METHODS), help="task_arithmetic and any of the others")
    ap.add_argument("--parents", type=int, default=3)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    ap.add_argument("--modes", default="resident,streaming")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eager", action="store_true", help="do not torch.compile the merge kernels")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--parent-paths", help=argparse.SUPPRESS)
    ap.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        child(args)
        return
    if "task_arithmetic" not in args.methods.split(","):
        ap.error("--methods must include task_arithmetic (the other times are ratios to it)")
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        t0 = time.perf_counter()
        config = llama_config(args.shape, args.params, args.dtype)
        base, parents = build(Path(tmp), config, args.parents, args.device)
        print(f"built base + {len(parents)} parents ({args.dtype}) in {time.perf_counter() - t0:.0f} s", flush=True)
        for mode in args.modes.split(","):
            def run(methods: str, *extra: str) -> list[str]:
                cmd = [sys.executable, __file__, "--mode", mode, "--base", base, "--parent-paths", ",".join(parents),
                       "--repeats", str(args.repeats), "--device", args.device, "--methods", methods, *extra]
                proc = subprocess.run(cmd + (["--eager"] if args.eager else []), stdout=subprocess.PIPE, text=True,
                                      check=True)
                return proc.stdout.strip().splitlines()

            lines = run(args.methods, "--timing")
            print("\n".join(lines[:-1]), flush=True)
            for method in args.methods.split(","):
                print("\n".join(run(method)), flush=True)
            result = json.loads(lines[-1])
            report(mode, result["best"], result["model_bytes"], result["n"], result["methods"])


if __name__ == "__main__":
    main()
