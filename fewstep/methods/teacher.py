"""The frozen teacher of a distillation method, written once: what may teach a student, and how it is attached.

A teacher is a model of the student's kind (``teacher_kind``): for the Gaussian students (progressive,
consistency, DMD2, GDD) any ``DenoiserMethod``, i.e. anything whose ``denoiser(x, sigma, class_labels)`` is
D in EDM's sigma space (a fewstep run, or an EDM pickle or a diffusers folder read by
``fewstep.checkpoints.load_method``); for DistillKac a ``KacTeacher``. It is checked by type and by the
settings its weights depend on, frozen, kept out of the student's state_dict and EMA, and the student's
network starts from its weights.
"""

from __future__ import annotations

from torch import nn

from fewstep.constructors import HYDRA_KEYS
from fewstep.errors import CheckpointError, ConfigError
from fewstep.samplers.guidance import check_guide, check_interval, guided_by

ARCHITECTURE = ("net",)  # with the data shape and the class count in use, what teacher and student weights share


class TaughtMethod:
    """Mixin for a LightningModule distilled from a frozen teacher.

    Class attributes: ``teacher_kind`` (the class a teacher must be an instance of), ``teacher_hparams`` (the
    hyperparameters that must match, beyond the architecture), ``keeps_teacher`` (False: the student only
    starts from it, as GDD does, so a resumed run needs none), ``student_only`` (prefixes of the student's
    tensors the teacher lacks).
    """

    teacher_kind: type
    teacher_hparams: tuple[str, ...] = ()
    keeps_teacher = True
    student_only: tuple[str, ...] = ()
    teacher = None
    has_teacher = False  # whether attach_teacher was called, kept teacher or not

    @classmethod
    def taught(cls, options: dict) -> bool:
        """Whether the method, with these options (its config as a plain dict), distils a teacher; a method that can
        also train from data (scm's sct mode) says no for that."""
        return True

    def attach_teacher(self, teacher, path=None, init_student: bool = True) -> None:
        """Freeze ``teacher`` (read from ``path``, recorded as ``teacher_ckpt``); start the student from its weights."""
        check_teacher(teacher, self, path or self.hparams.get("teacher_ckpt"))
        if path is not None:
            self.hparams.teacher_ckpt = str(path)
        teacher = teacher.eval().requires_grad_(False)
        if self.keeps_teacher:
            object.__setattr__(self, "teacher", teacher)  # not registered: out of state_dict and the EMA
        if init_student:
            start_from(self.net, teacher.net, self.student_only)
        self.has_teacher = True
        self.teacher_attached(teacher)

    def teacher_attached(self, teacher) -> None:
        """Hook for what a method builds from the teacher (target network, critic, discriminator backbone)."""

    def generator_start(self) -> str | None:
        """A checkpoint whose model the student starts from instead of the teacher (SiDA: a SiD run), or None."""
        return None

    def start_generator(self, model, path) -> None:
        """Start the student from ``model``, read from ``generator_start()``; after ``attach_teacher``."""
        raise NotImplementedError

    def require_teacher(self) -> None:
        """One line unless the teacher is attached; a method that only starts from it (``keeps_teacher`` False) needs
        none when its run resumes from a checkpoint."""
        resuming = not self.keeps_teacher and self._trainer is not None and self.trainer.ckpt_path is not None
        if self.has_teacher or resuming:
            return
        name = type(self).__name__.lower()
        resume = "" if self.keeps_teacher else ", or resume with ckpt_path=PATH"
        raise ConfigError(
            f"{name} has no teacher: call attach_teacher(teacher) before fitting (python -m fewstep.train method=... "
            f"teacher.ckpt=PATH finds or trains one){resume}"
        )

    def on_fit_start(self) -> None:
        self.require_teacher()
        if self.teacher is not None:
            self.teacher.to(self.device)
        super().on_fit_start()


class Staged:
    """Mixin for a method distilled in stages, each student teaching the next (progressive's rounds, DistillKac's
    stages): it says which step counts the stages have and how stage i's student is built from its teacher, so
    that ``fewstep/distill.py`` runs any such method the same way.

    ``options`` are the method's config as a plain dict (its ``_target_`` included); its ``pipeline_keys`` (the
    stages, their length, ``ema_decay``) are the pipeline's to read, and every other option goes to each stage.
    """

    pipeline_keys: tuple[str, ...] = ("ema_decay",)

    @classmethod
    def stage_steps(cls, options: dict) -> list[int]:
        """The step counts: the first teacher's, then each stage's student's."""
        raise NotImplementedError

    @classmethod
    def steps_per_stage(cls, options: dict) -> int | list[int]:
        """Training steps of each stage: one count for every stage, or a list with one per stage."""
        raise NotImplementedError

    @classmethod
    def stage_lengths(cls, options: dict) -> list[int]:
        """Each stage's training steps, from ``steps_per_stage``."""
        stages, length = len(cls.stage_steps(options)) - 1, cls.steps_per_stage(options)
        lengths = [length] * stages if isinstance(length, int) else list(length)
        if len(lengths) != stages or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in lengths):
            raise ConfigError(
                f"steps_per_stage={length}: give one step count for every stage, or one count >= 1 per stage "
                f"({stages} here, e.g. [{','.join(['400'] * stages)}])"
            )
        return lengths

    @classmethod
    def stage_options(cls, options: dict, teacher, teacher_path, teacher_steps: int, steps: int, first_sampler) -> dict:
        """The constructor arguments of the stage whose student takes ``steps`` where ``teacher`` (read from
        ``teacher_path``) takes ``teacher_steps``: the method's options but the pipeline's, under this stage's own
        (``stage_settings``)."""
        kept = {key: value for key, value in options.items() if key not in (*cls.pipeline_keys, *HYDRA_KEYS)}
        stage = cls.stage_settings(teacher, teacher_steps, steps, first_sampler)
        return {**kept, **stage, "teacher_ckpt": str(teacher_path)}

    @classmethod
    def stage_settings(cls, teacher, teacher_steps: int, steps: int, first_sampler) -> dict:
        """What the stage sets itself, from its teacher and step counts; ``first_sampler``: the first stage's teacher's
        solver (``teacher.sampler``), None in later stages."""
        raise NotImplementedError


class GuidedTeacher(TaughtMethod):
    """Mixin for a student of a guided EDM-space teacher: classifier-free guidance (1 + w) D(.|y) - w D(.|empty) when
    conditional, or autoguidance (1 + w) D - w D_guide by a weaker model of the teacher's data (``guide``; Karras et
    al. 2024), conditional or not; with w = ``guidance``, for sigma in ``guidance_interval`` only (null: every sigma).

    The subclass saves ``guidance``, ``guide`` and ``guidance_interval`` as hyperparameters (``check_guidance``
    first); ``fewstep.train`` reads the guide after the teacher and calls ``attach_guide``.
    """

    guide = None  # frozen, not registered: outside the state_dict and the EMA

    @staticmethod
    def check_guidance(guidance: float, guidance_interval) -> None:
        if guidance < 0:
            raise ConfigError(f"method.guidance={guidance}: the teacher's guidance scale must be >= 0")
        check_interval(guidance_interval)

    def attach_guide(self, guide, path=None) -> None:
        """Make the teacher's guidance autoguidance by ``guide`` (read from ``path``), checked against the teacher."""
        if self.teacher is None:
            raise ConfigError("method.guide guides a teacher, and this run has none: attach the teacher first (a method "
                              "trained from data, as scm's sct mode, takes no guide)")
        check_guide(self.teacher, guide, f"guide '{path}'" if path else "the guide")
        if path is not None:
            self.hparams.guide = str(path)
        object.__setattr__(self, "guide", guide.eval().requires_grad_(False))

    def on_fit_start(self) -> None:
        super().on_fit_start()  # the teacher (TaughtMethod)
        if self.hparams.get("guide") and self.guide is None:
            raise ConfigError(f"method.guide={self.hparams.guide} is not attached: call "
                              "student.attach_guide(fewstep.checkpoints.load_method(PATH), PATH) before fitting")
        if self.guide is not None:
            self.guide.to(self.device)

    def guided_teacher(self, class_labels=None, guidance: float | None = None):
        """The teacher's D(x, sigma) as the student learns it: guided as the class says (w a float or one per sample;
        default ``guidance``)."""
        w = self.hparams.guidance if guidance is None else guidance
        guide = None if self.guide is None else self.guide.denoiser
        return guided_by(self.teacher.denoiser, w, class_labels, self.null_label, guide, self.hparams.get("guidance_interval"))


def start_from(student: nn.Module, teacher: nn.Module, student_only: tuple[str, ...] = ()) -> None:
    """Copy the teacher network's weights into the student's; only tensors named in ``student_only`` may be missing."""
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    extra = [key for key in missing if not key.startswith(student_only)]
    if extra or unexpected:
        raise CheckpointError(f"the teacher's network does not fit the student's: {(extra + unexpected)[0]}")


def check_kind(teacher, student_class: type, path) -> None:
    """One line unless ``teacher`` (from ``path``) is of the kind ``student_class`` distils (``teacher_kind``)."""
    kind = student_class.teacher_kind
    if not isinstance(teacher, kind):
        where = f"teacher checkpoint '{path}'" if path else "the teacher"
        raise CheckpointError(
            f"{where} holds a {type(teacher).__name__}, not {kind.kind_name}: {student_class.__name__.lower()} distils "
            f"{kind.teacher_source}"
        )


def check_teacher(teacher, student, path) -> None:
    """One line naming why ``teacher`` (from ``path``) cannot teach ``student``: its kind or its settings."""
    where = f"teacher checkpoint '{path}'" if path else "the teacher"
    check_kind(teacher, type(student), path)
    if list(teacher.hparams.data_shape) != list(student.hparams.data_shape):
        raise CheckpointError(
            f"{where} makes images of shape {list(teacher.hparams.data_shape)} and this data set has "
            f"{list(student.hparams.data_shape)}: use the teacher's data (channels and data.resolution)"
        )
    if teacher.num_classes != student.num_classes:
        raise CheckpointError(
            f"{where} does not match this student: it is conditioned on {teacher.num_classes} classes, the student on "
            f"{student.num_classes}; set method.conditional to the teacher's (and data with its classes)"
        )
    for key in (*ARCHITECTURE, *student.teacher_hparams):
        if teacher.hparams.get(key) != student.hparams.get(key):
            raise CheckpointError(
                f"{where} does not match this student: its {key} is {teacher.hparams.get(key)}, the student's is "
                f"{student.hparams.get(key)}; use the teacher's model/data settings or another teacher"
            )


__all__ = ["Staged", "TaughtMethod", "check_kind", "check_teacher", "start_from"]
