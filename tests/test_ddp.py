"""PB under DistributedDataParallel on the CPU: 2 processes (gloo, a file:// store, spawned
here) on half batches against 1 process on the whole batch, across a full phase cycle
(neuron -> dendrite -> neuron with the new dendrites -> dendrite with cascades -> neuron);
checkpoints written by 2 ranks resumed by 1 and back; a restructure under DDP with BatchNorm;
candidates with a BatchNorm; the misuse errors; and the sharded loader.

The equivalence model has no BatchNorm: with half batches each rank's batch statistics differ
from the whole batch's (SyncBatchNorm, which would fix that, runs on GPUs only).  The BatchNorm
model checks instead that both ranks hold bit-identical states and decisions."""
import copy
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import pbp_fast as pbp
from pbp_fast import distributed
from pbp_fast.recipe.data import BatchLoader, ImageDataset

WORLD = 2
BATCH = 16            # the global batch: 8 per rank
CONFIG = dict(maximize=False, switch_mode="fixed", n_epochs=2, p_epochs=2, max_dendrites=2,
              warmup_batches=2, improvement_threshold=0.0)
CKPT_A, CKPT_B = 3, 7   # epochs after which the 2 ranks (A) and the 1 process (B) checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return x, (x[:, 0].mean((1, 2)) * 4).round().clamp(-1, 1).long() + 1


X, Y = _images(48, 0)
XV, YV = X[:20], Y[:20]  # the score only has to move: a slice of the training set


def _plain_net(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(),
                          nn.Conv2d(6, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 3))
    pbp.convert(model)
    return model


def _bn_net(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    pbp.convert(model)
    return model


def _optimizer(pb):  # the candidates' gradients are small: a large step makes them move
    return torch.optim.SGD(pb.parameters(), lr=30 if pb.phase == "dendrite" else 0.3,
                           momentum=0.9)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Run:
    """The user's loop under torchrun, the same code for any number of ranks: this rank's
    slice of every global batch, a sharded validation set whose summed loss is all-reduced, and
    ``wrap`` + a new optimizer after each restructure."""

    def __init__(self, model, pb):
        self.model, self.pb = model, pb
        self.net = distributed.wrap(model)
        self.opt = _optimizer(pb)
        self.states, self.decisions, self.nets = {}, {}, {}

    def epoch(self):
        r, w = distributed.rank(), distributed.world_size()
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(self.pb.epoch))
        self.model.train()
        self.nets[self.pb.epoch + 1] = (self.pb.phase, type(self.net).__name__)
        for b in range(len(X) // BATCH):
            idx = order[b * BATCH:(b + 1) * BATCH].chunk(w)[r]
            self.opt.zero_grad()
            F.cross_entropy(self.net(X[idx]), Y[idx]).backward()
            self.opt.step()
        distributed.broadcast_buffers(self.model)
        self.model.eval()
        with torch.no_grad():
            loss = F.cross_entropy(self.model(XV[r::w]), YV[r::w], reduction="sum")
        score = distributed.all_reduce_sum(loss).item() / len(XV)
        self.states[self.pb.epoch + 1] = _snapshot(self.model)  # candidate statistics included
        decision = self.pb.add_validation_score(score)
        self.decisions[decision.epoch] = (decision.phase, decision.event, decision.done,
                                          decision.num_dendrites, score)
        if decision.restructured and not decision.done:
            self.net = distributed.wrap(self.model)
            self.opt = _optimizer(self.pb)
        return decision

    def until(self, last_epoch, save_at=None, path=None):
        while self.pb.epoch < last_epoch:
            if self.epoch().done:
                break
            if self.pb.epoch == save_at:
                distributed.save({"model": self.model.state_dict(), "pb": self.pb.state_dict(),
                                  "opt": self.opt.state_dict(), "rng": torch.get_rng_state()},
                                 path)
        return self

    @classmethod
    def resume(cls, path, make):
        ck = torch.load(path, weights_only=True)
        model = make(seed=123)  # everything must come from the checkpoint
        model.load_state_dict(ck["model"])
        pb = pbp.PerforatedBackprop(model, **CONFIG)
        pb.load_state_dict(ck["pb"])
        run = cls(model, pb)
        run.opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"])
        return run


# -- processes -----------------------------------------------------------------------------------
def _entry(rank, store, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, *args)
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, fn, *args):
    store = tmp_path / f"store-{fn.__name__}"
    mp.spawn(_entry, args=(str(store), fn, args), nprocs=WORLD, join=True)


def _save_run(run, path):
    torch.save({"states": run.states, "decisions": run.decisions, "nets": run.nets}, path)


def _fresh(rank, out):
    """2 ranks, a whole run from scratch; rank 0 checkpoints after epoch A."""
    model = _plain_net(seed=0)
    run = _Run(model, pbp.PerforatedBackprop(model, **CONFIG))
    _save_run(run.until(100, save_at=CKPT_A, path=out / "a.pt"), out / f"fresh{rank}.pt")


def _resumed(rank, out):
    """2 ranks resume the checkpoint that one process wrote after epoch B."""
    _save_run(_Run.resume(out / "b.pt", _plain_net).until(100), out / f"resumed{rank}.pt")


def _close(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].shape == b[k].shape, (what, k)
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=2e-5, atol=2e-6,
                                   msg=lambda m: f"{what} {k}: {m}")


def _same_decisions(a, b, what):
    assert a.keys() == b.keys(), what
    for e in a:
        assert a[e][:4] == b[e][:4], (what, e)
        assert a[e][4] == pytest.approx(b[e][4], rel=1e-5), (what, e)


def test_two_ranks_on_half_batches_equal_one_process_and_resume_across_world_sizes(tmp_path):
    # one process, the whole batch: the reference
    model = _plain_net(seed=0)
    ref = _Run(model, pbp.PerforatedBackprop(model, **CONFIG)).until(100)
    events = [d[1] for d in ref.decisions.values() if d[1]]
    # the second dendrite set fails: the best model (1 dendrite) is restored and retried
    assert events == ["start_dendrite_phase", "add_dendrites", "start_dendrite_phase",
                      "add_dendrites", "retry", "add_dendrites", "stop"], events

    # 2 ranks from scratch; rank 0 writes a.pt after epoch A (mid dendrite phase)
    _spawn(tmp_path, _fresh, tmp_path)
    fresh = [torch.load(tmp_path / f"fresh{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, run in enumerate(fresh):
        for e, state in ref.states.items():
            _close(run["states"][e], state, f"rank {r} epoch {e}")
        _same_decisions(run["decisions"], ref.decisions, f"rank {r}")
    for e in ref.states:  # the ranks agree bit for bit
        for k, v in fresh[0]["states"][e].items():
            assert torch.equal(v, fresh[1]["states"][e][k]), (e, k)
    # DDP in the neuron phase; the model itself (with the candidate sync) in the dendrite phase
    kinds = {"neuron": "DistributedDataParallel", "dendrite": "Sequential"}
    assert all(kinds[phase] == kind for phase, kind in fresh[0]["nets"].values())

    # 1 process resumes the 2 ranks' checkpoint and writes b.pt after epoch B (mid dendrite
    # phase, with a cascade)
    one = _Run.resume(tmp_path / "a.pt", _plain_net).until(CKPT_B, save_at=CKPT_B,
                                                          path=tmp_path / "b.pt")
    for e in range(CKPT_A + 1, CKPT_B + 1):
        _close(one.states[e], ref.states[e], f"1 process resumed, epoch {e}")
        _same_decisions({e: one.decisions[e]}, {e: ref.decisions[e]}, f"epoch {e}")

    # and back to 2 ranks to the end
    _spawn(tmp_path, _resumed, tmp_path)
    for r in range(WORLD):
        back = torch.load(tmp_path / f"resumed{r}.pt", weights_only=True)
        assert sorted(back["states"]) == [e for e in ref.states if e > CKPT_B]
        for e, state in back["states"].items():
            _close(state, ref.states[e], f"2 ranks resumed, rank {r} epoch {e}")
        _same_decisions(back["decisions"],
                        {e: d for e, d in ref.decisions.items() if e > CKPT_B}, f"rank {r}")


# -- BatchNorm, restructures and misuse under DDP --------------------------------------------------
def _bn_ranks(rank, out):
    model = _bn_net(seed=rank)  # different on each rank: wrap gives every rank rank 0's
    run = _Run(model, pbp.PerforatedBackprop(model, **CONFIG)).until(100)
    _save_run(run, out / f"bn{rank}.pt")

    # a phase change without wrap(model) again
    model = _bn_net(seed=0)
    pb = pbp.PerforatedBackprop(model, **{**CONFIG, "n_epochs": 1})
    net = distributed.wrap(model)
    assert pb.add_validation_score(1.0).restructured and pb.phase == "dendrite"
    with pytest.raises(RuntimeError, match=r"call wrap\(model\) again"):
        net(X[:4])
    # the dendrite phase on a model that was never wrapped (e.g. a plain DDP)
    distributed.wrap(model)
    for u in pb.units.values():
        u.candidate_sync = None
    with pytest.raises(RuntimeError, match="not prepared with pbp_fast.distributed.wrap"):
        model(X[:4])
    # ranks that pass different scores
    distributed.wrap(model)
    with pytest.raises(RuntimeError, match="ranks disagree on the score"):
        pb.add_validation_score(float(rank))
    # a process group of its own; a copy of the wrapped model (e.g. for an EMA)
    group = dist.new_group(list(range(WORLD)))
    assert distributed.wrap(model, group=group) is model
    twin = copy.deepcopy(model)
    sync, twin_sync = model[0].candidate_sync, twin[0].candidate_sync
    assert twin_sync is not sync and twin_sync.group is group and twin_sync.units[0] is twin[0]
    # ranks that hold different structures (one missed a restructure)
    if rank == 1:
        pb.units["0"].add_dendrite()
    with pytest.raises(RuntimeError, match="every rank must build the same model"):
        distributed.wrap(model)


def test_restructures_under_ddp_with_batchnorm_keep_the_ranks_identical(tmp_path):
    _spawn(tmp_path, _bn_ranks, tmp_path)
    runs = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in range(WORLD)]
    assert runs[0]["decisions"] == runs[1]["decisions"]
    events = [d[1] for d in runs[0]["decisions"].values() if d[1]]
    assert events[:2] == ["start_dendrite_phase", "add_dendrites"], events
    for e, state in runs[0]["states"].items():  # BatchNorm buffers included
        assert state.keys() == runs[1]["states"][e].keys()
        for k, v in state.items():
            assert torch.equal(v, runs[1]["states"][e][k]), (e, k)
    reference = _bn_net(seed=0).state_dict()  # rank 0's initialisation won
    assert any(not torch.equal(v, _bn_net(seed=1).state_dict()[k]) for k, v in reference.items())


def _candidate_bn_step(rank, world):
    """A dendrite phase whose candidates have a BatchNorm (on _bn_net, rank 0's weights): one
    step on this rank's share of one global batch; returns the candidates' state."""
    model = _bn_net(seed=0)
    pb = pbp.PerforatedBackprop(model, **{**CONFIG, "n_epochs": 1, "candidate_bn": True})
    assert pb.add_validation_score(1.0).restructured and pb.phase == "dendrite"
    net = distributed.wrap(model)
    opt = _optimizer(pb)
    idx = torch.arange(BATCH).chunk(world)[rank]
    F.cross_entropy(net(X[idx]), Y[idx]).backward()
    opt.step()
    return {k: v for k, v in _snapshot(model).items() if ".candidate." in k}


def _candidate_bn_ranks(rank, out):
    torch.save(_candidate_bn_step(rank, WORLD), out / f"candidate_bn{rank}.pt")


def test_candidate_batchnorm_under_ddp_keeps_the_ranks_identical(tmp_path):
    """Each rank normalises a candidate with its own half batch; the running statistics follow
    the whole batch's moments: after one step they are one process's on the whole batch (the
    conv output does not depend on the normalisation), and every candidate state is the same
    on both ranks."""
    _spawn(tmp_path, _candidate_bn_ranks, tmp_path)
    ranks = [torch.load(tmp_path / f"candidate_bn{r}.pt", weights_only=True)
             for r in range(WORLD)]
    assert any(k.endswith("candidate.bn_var") for k in ranks[0])
    for k, v in ranks[0].items():
        assert torch.equal(v, ranks[1][k]), k
    one = _candidate_bn_step(0, 1)
    for k, v in one.items():
        if k.endswith(("candidate.bn_mean", "candidate.bn_var")):
            assert not torch.equal(v, torch.zeros_like(v) if "mean" in k else torch.ones_like(v))
            torch.testing.assert_close(ranks[0][k], v, rtol=1e-5, atol=1e-6, msg=k)


# -- one process and the sharded loader ----------------------------------------------------------
def test_single_process_helpers_are_no_ops():
    model = _plain_net(seed=0)
    for u in pbp.convert(model).values():
        u.candidate_sync = object()  # left over from a distributed run
    assert distributed.wrap(model) is model
    assert all(u.candidate_sync is None for u in pbp.convert(model).values())
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    loader = BatchLoader(ImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8),
                                      torch.zeros(4), ["a"]), 2)
    assert distributed.shard(loader) is loader


def test_sharded_loader_splits_the_single_process_batches():
    n = 50
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    ds = ImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"], mean=[0.0], std=[1 / 255])
    ident = lambda x: x[:, 0, 0, 0].round().long()  # noqa: E731  (normalised back to the index)
    # training: W ranks x B images per step = the single-process batches of W*B, in order
    whole = BatchLoader(ds, 12, shuffle=True, drop_last=True, seed=7)
    for w in (2, 3):
        ranks = [distributed.shard(BatchLoader(ds, 12 // w, shuffle=True, drop_last=True,
                                               seed=7), ranks=(r, w)) for r in range(w)]
        for epoch in (0, 1):
            for ld in [whole] + ranks:
                ld.set_epoch(epoch)
            assert all(len(ld) == len(whole) == 4 for ld in ranks)
            for ref, *parts in zip(whole, *ranks):
                assert torch.equal(ident(torch.cat([x for x, _ in parts])), ident(ref[0]))
                assert torch.equal(torch.cat([y for _, y in parts]), ref[1])
    # evaluation: every image exactly once over the ranks
    ranks = [distributed.shard(BatchLoader(ds, 4), ranks=(r, 3)) for r in range(3)]
    seen = [ident(x) for ld in ranks for x, _ in ld]
    assert sorted(torch.cat(seen).tolist()) == list(range(n))
    assert sum(len(ld) for ld in ranks) == len(seen) == 5 + 5 + 4
    with pytest.raises(ValueError, match="global batch"):
        distributed.shard(BatchLoader(ds, 20, drop_last=True), ranks=(0, 3))
