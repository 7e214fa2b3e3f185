"""Training randomness that does not depend on the number of devices: ``BatchNoise`` and every method's loss.

Two ranks with batch n, each drawing its rows of the global batch, must compute what one process computes
with batch 2n: for a loss that is a mean over the batch, the full-batch loss is the mean of the two halves'.
"""

import pytest
import torch

from fewstep.methods import DMD2, GDD, SCM, BatchNoise, Consistency, EDMTeacher, FlowTeacher, KacEndpoint, Progressive
from fewstep.methods.gdd import generator_loss
from fewstep.methods.meanflow import MeanFlow

from helpers import SHAPE, UNET, kac_model, randomize, student, teacher

N = 4  # per rank; two ranks


def ranks(seed: int, step: int) -> tuple[BatchNoise, BatchNoise, BatchNoise]:
    """One process with batch 2N, and ranks 0 and 1 with batch N each, at one step of one run."""
    one = BatchNoise.for_step(seed, step, 2 * N, "cpu")
    return one, *(BatchNoise.for_step(seed, step, N, "cpu", rank, 2) for rank in (0, 1))


def test_two_ranks_draw_together_what_one_process_draws_with_their_global_batch():
    one, r0, r1 = ranks(seed=3, step=7)
    for draw in (lambda b: b.randn(1, 2, 2), lambda b: b.rand(), lambda b: b.randint(5, 3)):
        torch.testing.assert_close(torch.cat([draw(r0), draw(r1)]), draw(one), rtol=0, atol=0)
    # a draw of several tensors keeps each one's rows together
    pair = lambda b: b.draw(lambda total, g: (torch.rand(total, generator=g), torch.randn(total, 2, generator=g)))  # noqa: E731
    for whole, halves in zip(pair(one), zip(pair(r0), pair(r1))):
        torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)


def test_steps_micro_batches_and_seeds_get_their_own_noise_and_validation_noise_repeats():
    base = BatchNoise.for_step(0, 5, N, "cpu").randn(3)
    for other in (BatchNoise.for_step(0, 6, N, "cpu"), BatchNoise.for_step(1, 5, N, "cpu"),
                  BatchNoise.for_step(0, 5, N, "cpu", micro_batch=1)):
        assert not torch.allclose(other.randn(3), base)
    torch.testing.assert_close(BatchNoise.for_step(0, 5, N, "cpu").randn(3), base, rtol=0, atol=0)
    torch.testing.assert_close(BatchNoise.fixed(2, N, "cpu").randn(3), BatchNoise.fixed(2, N, "cpu").randn(3))


def edm_teacher():
    return randomize(EDMTeacher(net=UNET, data_shape=SHAPE, num_classes=3, conditional=True, label_dropout=0.5))


def flow_teacher():
    return randomize(FlowTeacher(net=UNET, data_shape=SHAPE))


def kac_teacher():
    return randomize(kac_model(a=4.0, c=2.0, dim=2))


def kac_endpoint():
    method = randomize(kac_model(KacEndpoint, a=4.0, c=2.0, dim=2, student_steps=2, teacher_steps=4), seed=1)
    method.attach_teacher(kac_teacher())
    return method


def guided_consistency():
    teacher_ = teacher(num_classes=3, conditional=True)
    return student(Consistency, teacher_, num_classes=3, conditional=True, teacher_steps=8, sample_steps=2,
                   guidance_range=[1.0, 3.0])


def dmd2():
    method = student(DMD2, student_steps=4)
    randomize(method.fake_net, seed=2)  # a critic equal to the teacher gives a zero loss
    return method


METHODS = {
    "edm_teacher (label dropout)": edm_teacher,
    "flow_teacher": flow_teacher,
    "kac_teacher": kac_teacher,
    "kac_endpoint": kac_endpoint,
    "progressive": lambda: student(Progressive, student_steps=2),
    "consistency (guided)": guided_consistency,
    "dmd2 (backward simulation)": dmd2,
    "meanflow (guidance trained in)": lambda: randomize(MeanFlow(net=UNET, data_shape=SHAPE, num_classes=3, conditional=True,
                                                                 label_dropout=0.5, share=0.5, guidance=0.6, guidance_mix=0.2,
                                                                 power=0.0)),  # the adaptive weight's loss is near 1 at any noise
    "scm (scd, guided teacher)": lambda: student(SCM, teacher(num_classes=3, conditional=True), mode="scd", num_classes=3,
                                                 conditional=True, guidance=1.5, tangent_warmup=0),
}


def batch(method) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    shape = method.hparams.data_shape
    x0 = torch.rand(2 * N, *shape, generator=generator) * 2 - 1
    return x0, torch.randint(3, (2 * N,), generator=generator)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_methods_training_loss_is_the_same_on_one_process_and_on_two_ranks(name):
    method = METHODS[name]().train()
    x0, y = batch(method)

    def loss(rows, rng):
        return method.loss(x0[rows], method.training_labels(y[rows], rng), rng)

    one, r0, r1 = ranks(seed=0, step=3)
    whole = loss(slice(None), one)
    halves = (loss(slice(0, N), r0) + loss(slice(N, None), r1)) / 2
    torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-6)
    # and the noise matters: another step gives another loss
    assert not torch.allclose(loss(slice(None), ranks(seed=0, step=4)[0]), whole)


def test_gdd_generator_and_discriminator_losses_are_the_same_on_one_process_and_on_two_ranks():
    method = GDD(net=UNET, data_shape=SHAPE, discriminator={"kind": "conv", "channels": [8, 16]})
    method.attach_teacher(teacher())
    x_real, y = batch(method)

    def losses(rows, rng):
        fake = method.one_step(rng.randn_like(x_real[rows]), None)
        d = method.discriminator_losses(x_real[rows], fake, None, apply_r1=False)
        return torch.stack([d["loss"], generator_loss(method.discriminator(fake, None), method.hparams.loss)])

    one, r0, r1 = ranks(seed=0, step=3)
    torch.testing.assert_close((losses(slice(0, N), r0) + losses(slice(N, None), r1)) / 2, losses(slice(None), one),
                               rtol=1e-5, atol=1e-6)
