"""Student- and teacher-rollout states for DDIL (Garrepalli et al., arXiv 2410.11971): a bounded replay buffer
and the DataModule that serves it beside the data.

DDIL trains a distilled student on states x_sigma drawn from three sources with weights
(b_fwd, b_teacher, b_student): forward-diffused data, the teacher's backward rollouts and the student's own
backward rollouts (DAgger: the teacher labels the states the student visits). ``RolloutStates`` wraps the
image DataModule: its dataloaders are the data's own, and it owns one ``RolloutBuffer`` per rollout
source, which the method refreshes every ``refresh_every`` training steps with ``refresh_size`` new
trajectories of the current student (and teacher) and draws training states from.

Workers and devices: the buffers live in the training process, never in a dataloader worker (the
workers only load images), so ``num_workers > 0`` cannot serve stale copies. Under DDP every rank builds
its own DataModule and so its own buffers, filled by its own rollouts from its own seeds; buffers are
not synchronised across ranks. Their contents and counters are in the DataModule's state_dict, which
Lightning stores in every checkpoint, so a resumed run continues with the same buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch

from fewstep.errors import ConfigError

SOURCES = ("fwd", "teacher", "student")


class RolloutBuffer:
    """A ring buffer of at most ``capacity`` states (x, sigma, class label), oldest overwritten first."""

    def __init__(self, capacity: int):
        if int(capacity) != capacity or capacity < 1:
            raise ConfigError(f"rollout buffer size {capacity}: it must be an integer >= 1 (ddil.buffer.size)")
        self.capacity = int(capacity)
        self.x: torch.Tensor | None = None
        self.sigma = torch.zeros(self.capacity, dtype=torch.float32)
        self.labels = torch.full((self.capacity,), -1, dtype=torch.long)  # -1: no label
        self.added = 0  # states ever added

    def __len__(self) -> int:
        return min(self.added, self.capacity)

    def add(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Append a batch of states (kept on the CPU), overwriting the oldest once full."""
        x, sigma = x.detach().float().cpu(), sigma.detach().float().cpu().expand(x.shape[0])
        labels = torch.full((x.shape[0],), -1, dtype=torch.long) if labels is None else labels.detach().long().cpu()
        if self.x is None:
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=torch.float32)
        x, sigma, labels = x[-self.capacity:], sigma[-self.capacity:], labels[-self.capacity:]
        index = (self.added + torch.arange(x.shape[0])) % self.capacity
        self.x[index], self.sigma[index], self.labels[index] = x, sigma, labels
        self.added += x.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` states drawn uniformly with replacement: (x, sigma, labels) with label -1 for none."""
        if not len(self):
            raise ValueError("the rollout buffer is empty: refresh it before drawing states")
        index = torch.randint(len(self), (n,), generator=generator)
        return self.x[index], self.sigma[index], self.labels[index]

    def state_dict(self) -> dict:
        return {"x": self.x, "sigma": self.sigma, "labels": self.labels, "added": self.added, "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ConfigError(
                f"the checkpoint's rollout buffer holds {state['capacity']} states, this run's ddil.buffer.size is "
                f"{self.capacity}: resume with ddil.buffer.size={state['capacity']}"
            )
        self.x, self.sigma, self.labels, self.added = state["x"], state["sigma"], state["labels"], state["added"]


def check_weights(weights: Sequence[float]) -> torch.Tensor:
    """(b_fwd, b_teacher, b_student) as probabilities, or a one-line ConfigError."""
    w = torch.as_tensor([float(b) for b in weights], dtype=torch.float64)
    if w.numel() != len(SOURCES) or not torch.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ConfigError(
            f"DDIL weights (b_fwd, b_teacher, b_student) = {tuple(float(b) for b in weights)}: give three numbers >= 0 "
            "with a positive sum (e.g. ddil.b_fwd=0.5 ddil.b_teacher=0.25 ddil.b_student=0.25)"
        )
    return w / w.sum()


def draw_sources(weights: Sequence[float], n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The source of each of ``n`` training states (0 fwd, 1 teacher, 2 student), i.i.d. with the given weights."""
    device = generator.device if generator is not None else "cpu"
    return torch.multinomial(check_weights(weights).float().to(device), n, replacement=True, generator=generator)


class RolloutStates(L.LightningDataModule):
    """The data's DataModule plus one bounded rollout buffer per source, refreshed on a step schedule.

    ``refresh(step, rollout)`` calls ``rollout(source, refresh_size)`` for each source when
    ``step % refresh_every == 0`` (step 0 included, so the buffers are never empty once training runs);
    ``rollout`` returns (x [n, ...], sigma [n], labels [n] or None), states along new trajectories.
    """

    def __init__(
        self, data: L.LightningDataModule, size: int = 2048, refresh_every: int = 50, refresh_size: int = 64,
        sources: Sequence[str] = ("teacher", "student"), seed: int = 0,
    ):
        super().__init__()
        if int(refresh_every) != refresh_every or refresh_every < 1:
            raise ConfigError(f"ddil.buffer.refresh_every={refresh_every}: use an integer >= 1 (training steps)")
        if int(refresh_size) != refresh_size or refresh_size < 1:
            raise ConfigError(f"ddil.buffer.refresh_size={refresh_size}: use an integer >= 1 (trajectories per refresh)")
        unknown = sorted(set(sources) - set(SOURCES[1:]))
        if unknown:
            raise ConfigError(f"unknown rollout source '{unknown[0]}': choose from teacher, student")
        self.data = data
        self.refresh_every, self.refresh_size = int(refresh_every), int(refresh_size)
        self.buffers = {source: RolloutBuffer(size) for source in sources}
        self.refreshes: list[int] = []  # the steps at which the buffers were refreshed
        self.generator = torch.Generator().manual_seed(seed)

    # the data's own DataModule interface
    def __getattr__(self, name):
        if name in ("data", "__setstate__") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.data, name)

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.data.trainer = self.trainer  # the data's loader and state read the rank and the step reached from it
        self.data.setup(stage)

    def train_dataloader(self):
        return self.data.train_dataloader()

    def val_dataloader(self):
        return self.data.val_dataloader()

    # the buffers
    def due(self, step: int) -> bool:
        return step % self.refresh_every == 0 and step not in self.refreshes[-1:]

    def refresh(self, step: int, rollout: Callable[[str, int], tuple]) -> bool:
        """Add ``refresh_size`` new trajectories' states to each buffer if ``step`` is on the schedule."""
        if not self.due(step):
            return False
        for source, buffer in self.buffers.items():
            buffer.add(*rollout(source, self.refresh_size))
        self.refreshes.append(step)
        return True

    def draw(self, source: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` states of ``source`` (teacher or student), on the CPU: (x, sigma, labels with -1 for none)."""
        return self.buffers[source].sample(n, self.generator)

    def state_dict(self) -> dict:
        return {
            "data": self.data.state_dict(),
            "buffers": {source: buffer.state_dict() for source, buffer in self.buffers.items()},
            "refreshes": list(self.refreshes),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state.get("data", {}))
        for source, buffer in self.buffers.items():
            buffer.load_state_dict(state["buffers"][source])
        self.refreshes = list(state["refreshes"])
        self.generator.set_state(state["generator"])
