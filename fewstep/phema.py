"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3 and
App. C): power-function EMA profiles and the least-squares reconstruction of any profile from stored snapshots.

    python -m fewstep.phema RUN_DIR sigma_rel=0.03,0.06,0.1 [out=DIR] [ckpt=PATH]

reads the snapshots that ``fewstep.callbacks.PowerFunctionEMA`` wrote under RUN_DIR/phema, reconstructs the EMA of
each target sigma_rel at the last snapshot's step, and writes one fewstep checkpoint per target,
``OUT/sigma_rel_<sigma_rel>.ckpt`` (OUT: RUN_DIR/phema/reconstructed), whose EMA weights are the reconstruction.

A power-function EMA at time t averages the training trajectory theta(tau) with the profile
p_{gamma,t}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on 0 <= tau <= t, whose width relative to t is sigma_rel.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewstep.atomic import atomic_write
from fewstep.errors import CheckpointError, ConfigError, one_line
from fewstep.torch_files import check_torch_archive

SIGMA_REL_MAX = 0.289  # EDM2's bound: sigma_rel(gamma = 0) = sqrt(1/12) = 0.2887, a uniform average over [0, t]
SNAPSHOT_DIR = "phema"  # RUN/phema/phema-<t>-<sigma_rel>.pt
RECONSTRUCTED_DIR = "reconstructed"  # RUN/phema/reconstructed/sigma_rel_<sigma_rel>.ckpt
SNAPSHOT_FORMAT = "fewstep.phema.snapshot"
SNAPSHOT_NAME = re.compile(r"phema-(\d+)-([0-9.e+-]+)\.pt")


# -- the profiles ------------------------------------------------------------------------------------------------------
def gamma_to_sigma_rel(gamma):
    """sigma_rel of the profile tau^gamma: its standard deviation over its length t,
    sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel):
    """The exponent gamma whose profile has width ``sigma_rel``: squaring and clearing denominators,
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0, of which the largest real root is the
    one on the branch where sigma_rel falls as gamma grows."""
    sigma_rel = np.asarray(sigma_rel, dtype=np.float64)
    check_sigma_rel(sigma_rel.ravel().tolist())
    inverse_square = sigma_rel.ravel() ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]) for s in inverse_square]
    gamma = [r.real[np.abs(r.imag) < 1e-9 * max(1.0, np.abs(r).max())].max() for r in roots]
    return np.asarray(gamma, dtype=np.float64).reshape(sigma_rel.shape)


def check_sigma_rel(values) -> None:
    for value in values:
        if not (isinstance(value, (int, float)) and 0 < value < SIGMA_REL_MAX):
            raise ConfigError(f"sigma_rel={value} is outside EDM2's range 0 < sigma_rel < {SIGMA_REL_MAX} (a power-function "
                              "EMA's width relative to its length; EDM2 tracks 0.05 and 0.1): choose values in it")


def per_step_beta(t: int, gamma: float) -> float:
    """The decay at optimiser step t (t = 1, 2, ...) that keeps an EMA on the profile tau^gamma: (1 - 1/t)^(gamma + 1).
    After step t the EMA weighs the weights theta_s of step s by (s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1): the
    profile's mass over (s - 1, s], so the EMA is the continuous profile over the trajectory that holds theta_s there."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile(tau, t: float, gamma: float):
    """p_{gamma,t}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], 0 after t."""
    tau = np.asarray(tau, dtype=np.float64)
    inside = (tau >= 0) & (tau <= t)
    return np.where(inside, (gamma + 1) / t * np.clip(tau / t, 0, 1) ** gamma, 0.0)


def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> = integral of p_{gamma_a,t_a} p_{gamma_b,t_b}: with t_long the longer profile's length and gamma_long
    its exponent, (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) (t_short / t_long)^gamma_long / t_long."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    a_longer = t_a >= t_b
    t_long, t_short = np.where(a_longer, t_a, t_b), np.where(a_longer, t_b, t_a)
    gamma_long = np.where(a_longer, gamma_a, gamma_b)
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_short / t_long) ** gamma_long / t_long


def posthoc_coefficients(t_in, sigma_in, t_out, sigma_out) -> np.ndarray:
    """EDM2's least squares: the coefficients x[i, j] with sum_i x[i, j] p_i closest to target j in L2 over tau,
    from the normal equations A x = b (A[i, k] = <p_i, p_k>, b[i, j] = <p_i, q_j>), each column scaled to sum to one
    (the combination averages: it keeps a constant trajectory constant)."""
    t_in, sigma_in = (np.asarray(v, dtype=np.float64).ravel() for v in np.broadcast_arrays(t_in, sigma_in))
    t_out, sigma_out = (np.asarray(v, dtype=np.float64).ravel() for v in np.broadcast_arrays(t_out, sigma_out))
    gamma_in, gamma_out = sigma_rel_to_gamma(sigma_in), sigma_rel_to_gamma(sigma_out)
    A = profile_inner(t_in[:, None], gamma_in[:, None], t_in[None, :], gamma_in[None, :])
    b = profile_inner(t_in[:, None], gamma_in[:, None], t_out[None, :], gamma_out[None, :])
    try:
        x = np.linalg.solve(A, b)
    except np.linalg.LinAlgError:
        raise ConfigError("the snapshots' profiles are linearly dependent (two snapshots of one step and sigma_rel?): "
                          "remove the duplicates") from None
    return x / x.sum(axis=0, keepdims=True)


def profile_error(t_in, sigma_in, coefficients, t_out, sigma_out) -> np.ndarray:
    """||q_j - sum_i x[i, j] p_i|| / ||q_j|| per target j (L2 over tau): how far the reconstruction's profile is from
    the target's, from the closed-form inner products."""
    t_in, sigma_in = (np.asarray(v, dtype=np.float64).ravel() for v in np.broadcast_arrays(t_in, sigma_in))
    t_out, sigma_out = (np.asarray(v, dtype=np.float64).ravel() for v in np.broadcast_arrays(t_out, sigma_out))
    gamma_in, gamma_out = sigma_rel_to_gamma(sigma_in), sigma_rel_to_gamma(sigma_out)
    A = profile_inner(t_in[:, None], gamma_in[:, None], t_in[None, :], gamma_in[None, :])
    b = profile_inner(t_in[:, None], gamma_in[:, None], t_out[None, :], gamma_out[None, :])
    target = profile_inner(t_out, gamma_out, t_out, gamma_out)
    x = np.asarray(coefficients, dtype=np.float64)
    squared = target - 2 * np.einsum("ij,ij->j", x, b) + np.einsum("ij,ik,kj->j", x, A, x)
    return np.sqrt(np.clip(squared, 0, None) / target)


# -- snapshots ---------------------------------------------------------------------------------------------------------
def sigma_rel_name(sigma_rel: float) -> str:
    """sigma_rel as it appears in file names: Python's shortest repr (0.05, 0.1), which is also how Hydra writes a float
    into an interpolated path (``ckpt=RUN/phema/reconstructed/sigma_rel_${sigma_rel}.ckpt``)."""
    return repr(float(sigma_rel))


def snapshot_path(directory: str | Path, t: int, sigma_rel: float) -> Path:
    return Path(directory) / f"phema-{t:07d}-{sigma_rel_name(sigma_rel)}.pt"


def reconstructed_path(out: str | Path, sigma_rel: float) -> Path:
    return Path(out) / f"sigma_rel_{sigma_rel_name(sigma_rel)}.ckpt"


def save_snapshot(directory: str | Path, t: int, global_step: int, sigma_rel: float, method_class: str,
                  weights: dict[str, torch.Tensor]) -> Path:
    """One tracked EMA at step t, written whole or not at all; tensors and plain values only (read with weights_only)."""
    payload = {"format": SNAPSHOT_FORMAT, "t": int(t), "global_step": int(global_step), "sigma_rel": float(sigma_rel),
               "method_class": method_class, "weights": {name: w.detach().to("cpu", copy=True) for name, w in weights.items()}}
    path = snapshot_path(directory, t, sigma_rel)
    return atomic_write(path, lambda file: torch.save(payload, file))


@dataclass
class Snapshot:
    path: Path
    t: int
    global_step: int
    sigma_rel: float
    method_class: str
    weights: dict  # name -> tensor (memory-mapped)


def read_snapshot(path: Path) -> Snapshot:
    """A snapshot file read without running code from it (weights_only), its fields checked, or a one-line error."""
    check_torch_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated, corrupted, or naming globals weights_only refuses
        raise CheckpointError(f"cannot read post-hoc EMA snapshot '{path}' ({type(error).__name__}): it is truncated, "
                              "corrupted or not a snapshot; remove it and reconstruct again") from None
    expected = {"format": str, "t": int, "global_step": int, "sigma_rel": float, "method_class": str, "weights": dict}
    if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT or any(
            not isinstance(payload.get(key), kind) for key, kind in expected.items()):
        raise CheckpointError(f"'{path}' is not a post-hoc EMA snapshot written by fewstep: remove it from the directory")
    weights = payload["weights"]
    if not weights or not all(isinstance(k, str) and isinstance(v, torch.Tensor) and v.is_floating_point()
                              for k, v in weights.items()):
        raise CheckpointError(f"'{path}': its weights are not a mapping of names to floating-point tensors: remove it")
    match = SNAPSHOT_NAME.fullmatch(path.name)
    if payload["t"] < 1 or match is None or int(match[1]) != payload["t"]:
        raise CheckpointError(f"'{path}': its step {payload['t']} does not match its name: remove it or restore its name")
    check_sigma_rel([payload["sigma_rel"]])
    return Snapshot(path, payload["t"], payload["global_step"], payload["sigma_rel"], payload["method_class"], weights)


def snapshot_dir(run: str | Path) -> Path:
    """RUN/phema, or RUN itself when it holds the snapshots."""
    run = Path(run)
    return run if any(run.glob("phema-*.pt")) else run / SNAPSHOT_DIR


def read_snapshots(run: str | Path) -> list[Snapshot]:
    """Every snapshot under ``run``, by step then sigma_rel, all of one network (same method, tensor names, shapes)."""
    directory = snapshot_dir(run)
    paths = sorted(p for p in directory.glob("phema-*.pt") if SNAPSHOT_NAME.fullmatch(p.name))
    if not paths:
        raise CheckpointError(f"no post-hoc EMA snapshots (phema-<step>-<sigma_rel>.pt) under '{directory}': train with "
                              "callbacks=phema (or callbacks=[benchmark,phema]) and pass "
                              "that run's directory")
    snapshots = sorted((read_snapshot(p) for p in paths), key=lambda s: (s.t, s.sigma_rel))
    first = snapshots[0]
    for snapshot in snapshots[1:]:
        reason = network_difference(first.weights, snapshot.weights)
        if snapshot.method_class != first.method_class:
            reason = f"it holds a {snapshot.method_class}, '{first.path.name}' a {first.method_class}"
        if reason:
            raise CheckpointError(f"'{snapshot.path}' is a snapshot of another network than '{first.path}' ({reason}): "
                                  "keep one run's snapshots in the directory")
    return snapshots


def network_difference(ours: dict, theirs: dict) -> str | None:
    """The first tensor name or shape that differs between two weight mappings (one phrase), or None."""
    for name in ours.keys() | theirs.keys():
        if name not in ours or name not in theirs:
            return f"only one of them has the tensor {str(name)[:80]!r}"
        if ours[name].shape != theirs[name].shape:
            return f"its tensor {name!r} is {tuple(theirs[name].shape)}, the other's {tuple(ours[name].shape)}"
    return None


# -- reconstruction ----------------------------------------------------------------------------------------------------
def reconstruct(snapshots: list[Snapshot], sigma_out: list[float], t_out: int | None = None):
    """The EMA weights of each target sigma_rel at step ``t_out`` (None: the last snapshot's), combined from the
    snapshots up to it: ({sigma_rel: {name: float32 tensor}}, coefficients [snapshot, target], profile errors,
    the snapshots used). Sums run in float64 one tensor at a time, so the memory is that of one tensor per snapshot."""
    check_sigma_rel(sigma_out)
    t_out = max(s.t for s in snapshots) if t_out is None else t_out
    used = [s for s in snapshots if s.t <= t_out]
    t_in, sigma_in = [s.t for s in used], [s.sigma_rel for s in used]
    x = posthoc_coefficients(t_in, sigma_in, t_out, sigma_out)
    errors = profile_error(t_in, sigma_in, x, t_out, sigma_out)
    out = {sigma: {} for sigma in sigma_out}
    for name in used[0].weights:
        stacked = torch.stack([s.weights[name].to(torch.float64) for s in used])  # [snapshot, ...]
        combined = torch.tensordot(torch.from_numpy(x).T, stacked, dims=1)  # [target, ...]
        for j, sigma in enumerate(sigma_out):
            out[sigma][name] = combined[j].to(torch.float32)
    return out, x, errors, used


def run_checkpoint(run: Path, global_step: int) -> Path:
    """The run's checkpoint of ``global_step`` (checkpoints/step_<N>.ckpt) if kept, else its latest readable one."""
    from fewstep import layout
    from fewstep.checkpoints import latest_checkpoint

    kept = layout.kept_checkpoints(run)
    if global_step in kept:
        return kept[global_step]
    found = latest_checkpoint(layout.checkpoints(run))
    if found is None:
        raise CheckpointError(f"no readable checkpoint under '{layout.checkpoints(run)}': pass ckpt=PATH, the run's "
                              "checkpoint whose EMA weights the reconstruction replaces")
    return found


def with_ema(checkpoint: dict, weights: dict[str, torch.Tensor], record: dict) -> dict:
    """``checkpoint`` with its EMA weights (``state_dict``) replaced by ``weights``; the trained weights stay in
    ``current_model_state`` (moved there when the run kept no fixed EMA), and the tracking callback's state is left out."""
    state = dict(checkpoint["state_dict"])
    out = dict(checkpoint)
    out.setdefault("current_model_state", dict(checkpoint["state_dict"]))
    for name, value in weights.items():
        state[name] = value.to(state[name].dtype)
    out["state_dict"] = state
    out["callbacks"] = {k: v for k, v in (checkpoint.get("callbacks") or {}).items() if "PowerFunctionEMA" not in str(k)}
    out["fewstep"] = {**checkpoint["fewstep"], "phema": record}
    return out


def reconstruct_run(run: str | Path, sigma_out: list[float], out: str | Path | None = None,
                    ckpt: str | Path | None = None) -> list[dict]:
    """Reconstruct each target of ``sigma_out`` from ``run``'s snapshots and write ``OUT/sigma_rel_<value>.ckpt``:
    one row (sigma_rel, gamma, t, snapshots, error, path) per target."""
    from fewstep.checkpoints import read_checkpoint

    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"run directory '{run}' not found: pass the directory of a run trained with callbacks=phema")
    check_sigma_rel(sigma_out)
    names = [sigma_rel_name(s) for s in sigma_out]
    if len(set(names)) != len(names):
        raise ConfigError(f"sigma_rel={','.join(names)} names a value twice: give each once")
    snapshots = read_snapshots(run)
    weights, x, errors, used = reconstruct(snapshots, sigma_out)
    last = used[-1]
    ckpt = Path(ckpt) if ckpt else run_checkpoint(snapshot_dir(run).parent, last.global_step)  # RUN of RUN/phema
    checkpoint = read_checkpoint(ckpt)
    stored_class = checkpoint["fewstep"].get("method_class")
    if stored_class != last.method_class:
        raise CheckpointError(f"the snapshots hold a {last.method_class}, checkpoint '{ckpt}' a {stored_class}: pass "
                              "ckpt=PATH of the run that wrote them")
    reason = next((f"its tensor {n!r} does not fit the checkpoint's network" for n, w in last.weights.items()
                   if n not in checkpoint["state_dict"] or checkpoint["state_dict"][n].shape != w.shape), None)
    if reason:
        raise CheckpointError(f"the snapshots are of another network than checkpoint '{ckpt}' ({reason}): pass ckpt=PATH "
                              "of the run that wrote them")
    out = Path(out) if out else snapshot_dir(run) / RECONSTRUCTED_DIR
    gammas = sigma_rel_to_gamma(np.asarray(sigma_out))
    rows = []
    for j, sigma in enumerate(sigma_out):
        record = {"sigma_rel": float(sigma), "gamma": float(gammas[j]), "t": last.t, "global_step": last.global_step,
                  "snapshots": len(used), "profile_error": float(errors[j])}
        result = with_ema(checkpoint, weights[sigma], record)
        path = atomic_write(reconstructed_path(out, sigma), lambda file, r=result: torch.save(r, file), sync=True)
        rows.append({**record, "path": str(path), "checkpoint": str(ckpt)})
    return rows


# -- command line ------------------------------------------------------------------------------------------------------
USAGE = "usage: python -m fewstep.phema RUN_DIR sigma_rel=0.03,0.06,0.1 [out=DIR] [ckpt=PATH]"


def parse_arguments(argv: list[str]) -> dict:
    """RUN_DIR and key=value options, each checked, or a one-line ConfigError."""
    positional = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(options) - {"sigma_rel", "out", "ckpt"}
    if len(positional) != 1 or unknown or "sigma_rel" not in options:
        raise ConfigError(USAGE + (f" (unknown option {sorted(unknown)[0]})" if unknown else ""))
    try:
        sigma_out = [float(v) for v in options["sigma_rel"].strip("[]").split(",")]
    except ValueError:
        raise ConfigError(f"sigma_rel={options['sigma_rel']}: give numbers separated by commas, e.g. sigma_rel=0.03,0.06,0.1") from None
    if not all(math.isfinite(v) for v in sigma_out):
        raise ConfigError(f"sigma_rel={options['sigma_rel']}: give finite numbers")
    check_sigma_rel(sigma_out)
    return {"run": positional[0], "sigma_out": sigma_out, "out": options.get("out"), "ckpt": options.get("ckpt")}


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"post-hoc EMA at step {first['t']} (global step {first['global_step']}) from {first['snapshots']} "
                        "snapshots", caption=f"in {Path(first['path']).parent}; trained weights from {first['checkpoint']}")
    for column in ("sigma_rel", "gamma", "profile error", "checkpoint"):
        table.add_column(column, no_wrap=column == "checkpoint")
    for row in rows:
        table.add_row(sigma_rel_name(row["sigma_rel"]), f"{row['gamma']:.3f}", f"{row['profile_error']:.2e}",
                      Path(row["path"]).name)
    Console(soft_wrap=True).print(table)


def main(argv: list[str]) -> None:
    from fewstep.cli import fail, line_buffered_output
    from fewstep.errors import FewstepError

    line_buffered_output()
    try:
        print_table(reconstruct_run(**parse_arguments(argv)))
    except FewstepError as error:
        fail(one_line(str(error)))


if __name__ == "__main__":
    main(sys.argv[1:])
