"""Review of branch resumegaps (gap 1, ``ahead-step`` / ``ahead-shape`` in every begin): a
malicious cloud sends begins with every kind of ``ahead`` (below, at, above the tenant's
counter; huge; lying shapes; malformed; replays of old begins; with a restart jump) to a
real :class:`SecureClientParty`. The tenant must never open under a step number it used
before (a Beaver mask opened twice gives the difference of two inputs), every refused begin
must leave its counter unchanged, and it may move past at most one number per begin.

Passing = the attack fails (no finding)."""

from __future__ import annotations

import pytest

from flower_split.data import TokenizedDataset
from flower_split.protocol import ProtocolError
from flower_split.protocol.secure_messages import MAX_STEP, RESUME_JUMP_MIN, RESUME_STEP_GAP
from flower_split.protocol.secure_shape import step_shape

from test_secure_prefetch import _parties

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_malicious_cloud_cannot_make_the_tenant_reuse_a_step_number(secure_data: TokenizedDataset) -> None:
    client, _cloud, _dealer = _parties(secure_data)
    batch = secure_data.collate(list(range(8)))
    b, t, r = step_shape(batch.attention_mask)
    used: list[int] = []

    def own() -> int:
        return int(client.state_dict()["next_step"])

    def begin(train: bool, cloud_step: int, ahead: object) -> int:
        before = own()
        first = client.begin(batch, train=train, cloud_step=cloud_step, ahead=ahead)  # type: ignore[arg-type]
        client.abort_step()  # the cloud never answers: the tenant opened the first message's values
        assert first.step not in used, f"step {first.step} opened twice"
        assert first.step >= before and first.step <= max(before, cloud_step) + 1
        assert own() == first.step + 1
        used.append(first.step)
        return first.step

    for train in (True, False):
        for rel in (-1, 0, 1):  # ahead below, at, above the tenant's counter
            for shape in ((b, t, r), (b + 1, t, r), (b, t - 1, r), (b, t, r - 1), (b, t, 0), (0, 0, 0), (-b, -t, -r),
                          (1 << 40, 1 << 40, 1 << 40)):
                n = own()
                begin(train, n, (n + rel, *shape))
                begin(train, 0, (n + rel, *shape))  # a replayed old begin (cloud step 0, old ahead)
    n = own()
    for ahead in ((MAX_STEP - 1, b, t, r), (MAX_STEP, b, t, r), (-1, b, t, r), (1 << 70, b, t, r)):
        assert begin(False, n, ahead) == n  # huge / negative: no effect
        n = own()
    # the restart jump: a cloud RESUME_JUMP_MIN ahead, holding material ahead at its number
    jump = own() + RESUME_JUMP_MIN
    assert begin(False, jump, (jump, b, t, r)) == jump + 1
    assert begin(True, jump, (jump, b, t, r)) == jump + 2  # a replay of the jump: nothing reused
    far = own() + RESUME_STEP_GAP  # the most a restarted cloud skips
    assert begin(True, far, (far, b + 1, t, r)) == far + 1
    # malformed ahead: refused before anything is opened, counter unchanged
    for bad in ((own(), b, t), (own(), True, t, r), (own(), float(b), t, r), (own(), b, t, r, 0), [own(), b, t, r], "x",
                (str(own()), b, t, r)):
        before = own()
        with pytest.raises(ProtocolError):
            client.begin(batch, train=False, cloud_step=before, ahead=bad)  # type: ignore[arg-type]
        assert own() == before and client.steps_in_flight == []
    # exhausting the step space: one number per begin at most past what the jump rule allows
    assert len(used) == len(set(used)) and used == sorted(used)


def test_material_ahead_whose_reply_was_lost_does_not_cost_the_tenant_its_next_step(
        secure_data: TokenizedDataset) -> None:
    """The dealer dealt step 0 ahead (its counter moved on) but its reply never came (the
    dealer node killed after handling it, gap 2's own scenario). Review finding F4: the cloud
    used to forget the prefetch, so the next begin carried no ahead-step, the tenant took step
    0 and the dealer refused to deal it again (the tenant dropped from the round). Now the
    cloud keeps the number as spent and advertises it with shape (0, 0), so the tenant moves
    past it. Failing = the gap is there (availability only; nothing is opened twice)."""
    client, cloud, dealer = _parties(secure_data)
    announced = secure_data.collate(list(range(8)))
    dealer.handle(cloud.prefetch_request("t0", *step_shape(announced.attention_mask)))  # dealt; the reply is lost
    assert cloud.tenants["t0"].ahead() == (0, 0, 0, 0)  # kept and advertised as a shape no batch has
    first = client.begin(announced, cloud_step=cloud.next_step("t0"), ahead=cloud.tenants["t0"].ahead())
    request = cloud.material_request(first)
    assert request is not None
    try:
        dealer.handle(request)
    except ProtocolError as exc:
        pytest.fail(f"the tenant's step {first.step} cannot be served: {exc}")
