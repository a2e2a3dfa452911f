"""The scheduler, one pass at a time, against fake pools and job views (no Ray, no store)."""

from __future__ import annotations

from jobs.contracts.demand import job_demand
from jobs.specs.train import TrainSpec
from orchestrator.ray_client import NodeView, UnmanagedJob
from orchestrator.scheduler.policies import BestFit, LowerPriorityFirst, PriorityFairOrder
from orchestrator.scheduler.pools import build_pools, never_fits
from orchestrator.scheduler.schedule import Admit, Policies, schedule_pass
from orchestrator.scheduler.views import JobView


def _node(node_id, resources, labels=None, state="ALIVE"):
    return NodeView(node_id, "10.0.0.1", False, state, resources, labels or {})


A100 = {"ray.io/accelerator-type": "A100"}
CLUSTER = [
    _node("head", {"CPU": 8.0, "node:__internal_head__": 1.0}),
    _node("g1", {"CPU": 16.0, "GPU": 4.0, "accelerator_type:A100": 1.0}, A100),
    _node("g2", {"CPU": 16.0, "GPU": 4.0}, A100),
    _node("n1", {"CPU": 32.0, "NPU": 8.0}),
    _node("gone", {"CPU": 64.0, "GPU": 8.0}, A100, state="DEAD"),
]


def _gpu(job_id, gpus, team="a", priority="normal", at=0.0, placement=None, running=False):
    return JobView(job_id, team, priority, at, {"gpu": {"GPU": float(gpus), "CPU": float(gpus) + 1}},
                   placement or {}, running)


def _booked(job: JobView, pool="gpu-a100") -> JobView:
    return JobView(job.id, job.team, job.priority, job.submitted_at, job.demand, {k: pool for k in job.demand},
                   True)


def test_pools_come_from_resources_and_labels():
    pools = build_pools([*CLUSTER, _node("c2", {"CPU": 4.0}, {"orch.io/pool": "cpu-fast"})],
                        unmanaged=[UnmanagedJob("raysubmit_1", "02000000", "RUNNING", {"g1": {"GPU": 2.0, "CPU": 2.0}})],
                        max_extra={"gpu-a100": {"GPU": 8.0}, "npu-910b": {"NPU": 16.0}})
    assert set(pools) == {"cpu", "cpu-fast", "gpu-a100", "npu", "npu-910b"}
    a100 = pools["gpu-a100"]
    assert (a100.nodes, a100.capacity, a100.device) == (2, {"CPU": 32.0, "GPU": 8.0}, "gpu")  # dead node left out
    assert a100.unmanaged == {"GPU": 2.0, "CPU": 2.0} and a100.max_capacity["GPU"] == 16.0
    assert pools["npu"].capacity == {"CPU": 32.0, "NPU": 8.0} and pools["cpu"].capacity == {"CPU": 8.0}
    assert pools["npu-910b"].nodes == 0 and pools["npu-910b"].max_capacity == {"NPU": 16.0}


def test_demand_counts_workers_driver_and_ray_data():
    spec = TrainSpec.model_validate({"resources": {"num_workers": 4, "device": "gpu", "cpus_per_worker": 2}})
    assert job_demand(spec, {"CPU": 0.5, "head": 0.01}) == {"gpu": {"CPU": 9.5, "GPU": 4.0, "head": 0.01}}
    assert job_demand(TrainSpec()) == {"cpu": {"CPU": 3.0}}  # 2 workers x 1 CPU + 1 for Ray Data
    mixed = TrainSpec.model_validate({"resources": {"pools": {"gpu-a100": 2, "cpu": 4}}})
    assert job_demand(mixed) == {"gpu-a100": {"CPU": 2.0, "GPU": 2.0}, "cpu": {"CPU": 5.0}}


def test_a_job_larger_than_the_cluster_at_its_autoscaler_maximum_never_fits():
    pools = build_pools(CLUSTER)
    why = never_fits({"gpu": {"GPU": 12.0}}, pools)
    assert why == "pool gpu-a100 can hold at most 8 GPU, 32 CPU; the job needs 12 GPU there (short by 4 GPU)"
    assert never_fits({"gpu": {"GPU": 12.0}}, build_pools(CLUSTER, max_extra={"gpu-a100": {"GPU": 4.0}})) is None
    assert "no pool 'gpu-h100'" in never_fits({"gpu-h100": {"GPU": 1.0}}, pools)


def test_jobs_are_admitted_while_they_fit_and_the_rest_wait_with_reason_and_position():
    pools = build_pools(CLUSTER)
    queued = [_gpu(f"j{i}", 4, at=i) for i in range(4)]
    d = schedule_pass(pools, queued, admitted=[])
    assert [a.job_id for a in d.admit] == ["j0", "j1"] and d.admit[0] == Admit("j0", {"gpu": "gpu-a100"})
    assert [(w.job_id, w.position, w.reason) for w in d.wait] == [
        ("j2", 1, "waiting for 4 GPU in pool gpu-a100; 0 jobs ahead"),
        ("j3", 2, "waiting behind job j2, ahead in the queue for the same pool; 1 job ahead")]
    assert d.reserved["gpu-a100"] == {"GPU": 8.0, "CPU": 10.0}
    assert d.queued_demand == {"gpu": {"GPU": 8.0, "CPU": 10.0}}


def test_unmanaged_jobs_take_from_what_the_pools_give():
    pools = build_pools(CLUSTER, unmanaged=[UnmanagedJob(None, "03000000", "RUNNING", {"g2": {"GPU": 3.0}})])
    d = schedule_pass(pools, [_gpu("j0", 4), _gpu("j1", 2, at=1)], admitted=[])
    assert [a.job_id for a in d.admit] == ["j0"]
    assert d.wait[0].reason.startswith("waiting for 1 GPU in pool gpu-a100")


def test_a_large_job_at_the_head_is_not_starved_by_small_ones_but_other_pools_go_on():
    pools = build_pools(CLUSTER)
    running = [_booked(_gpu("r", 6))]
    queued = [_gpu("big", 4, at=1), _gpu("small", 1, at=2),
              JobView("npu-job", "b", "normal", 3.0, {"npu": {"NPU": 8.0, "CPU": 9.0}})]
    d = schedule_pass(pools, queued, admitted=running)
    assert [a.job_id for a in d.admit] == ["npu-job"]
    assert [w.job_id for w in d.wait] == ["big", "small"] and "behind job big" in d.wait[1].reason


def test_priority_classes_then_teams_holding_least_go_first():
    held = [_booked(_gpu("a-run", 4, team="a"))]
    queued = [_gpu("a1", 1, team="a", at=1), _gpu("a2", 1, team="a", at=2), _gpu("b1", 1, team="b", at=3),
              _gpu("b2", 1, team="b", at=4), _gpu("c-low", 1, team="c", priority="low", at=0),
              _gpu("c-high", 1, team="c", priority="high", at=9)]
    ordered = PriorityFairOrder().order(queued, {"a": {"gpu-a100": 4.0}})
    # b holds nothing, a holds 4 GPUs: b's jobs (2 GPUs with their own) still go before a's first.
    assert [j.id for j in ordered] == ["c-high", "b1", "b2", "a1", "a2", "c-low"]
    d = schedule_pass(build_pools(CLUSTER), queued, admitted=held)
    assert [a.job_id for a in d.admit] == ["c-high", "b1", "b2", "a1"]


def test_team_quota_is_enforced_and_holds_up_no_one_else():
    quotas = {"a": {"gpu": 4.0}}
    held = [_booked(_gpu("a-run", 3, team="a"))]
    d = schedule_pass(build_pools(CLUSTER), [_gpu("a1", 2, team="a", at=1), _gpu("b1", 2, team="b", at=2)],
                      admitted=held, quotas=quotas)
    assert [a.job_id for a in d.admit] == ["b1"]
    assert d.wait[0].reason == ("waiting for quota: team a quota for gpu is 4 devices; it holds 3 and this one "
                                "needs 2; 0 jobs ahead")


def test_serving_replicas_take_no_active_job_slot_and_are_never_preempted():
    replicas = JobView("d1", "a", "low", 0.0, {"cpu": {"CPU": 4.0}}, {"cpu": "cpu"}, slot=False)
    queued = [JobView("d2", "a", "normal", 1.0, {"cpu": {"CPU": 2.0}}, slot=False), _gpu("j1", 2, at=2)]
    d = schedule_pass(build_pools(CLUSTER), queued, admitted=[replicas], max_active=1)
    assert [a.job_id for a in d.admit] == ["d2", "j1"]  # one slot: the job's; the deployments take none
    urgent = JobView("j2", "b", "high", 3.0, {"cpu": {"CPU": 8.0}})
    d = schedule_pass(build_pools(CLUSTER), [urgent], admitted=[replicas])
    assert d.preempt == [] and d.wait[0].reason.startswith("waiting for 4 CPU in pool cpu")


def test_quota_holds_within_one_pass_of_many_submits():
    queued = [_gpu(f"j{i}", 1, team="a", at=i) for i in range(20)]
    d = schedule_pass(build_pools(CLUSTER), queued, admitted=[], quotas={"a": {"gpu-a100": 3.0}})
    assert len(d.admit) == 3


def test_active_job_limit():
    d = schedule_pass(build_pools(CLUSTER), [_gpu(f"j{i}", 1, at=i) for i in range(3)], admitted=[], max_active=2)
    assert len(d.admit) == 2 and "active-job slot" in d.wait[0].reason


def test_a_higher_priority_job_preempts_the_fewest_lower_priority_ones_then_waits_for_them():
    pools = build_pools(CLUSTER)
    running = [_booked(_gpu("low-old", 4, priority="low", at=0)), _booked(_gpu("low-new", 2, priority="low", at=5)),
               _booked(_gpu("normal", 2, at=1))]
    high = _gpu("high", 4, priority="high", at=9)
    d = schedule_pass(pools, [high], admitted=running)
    # low-new alone frees 2 GPUs, too few; low-old frees 4 and is enough without low-new.
    assert [(p.job_id, p.for_job) for p in d.preempt] == [("low-old", "high")]
    assert "preempting 1 lower-priority job (low-old)" in d.wait[0].reason
    # The next pass: low-old is stopping. No second victim; a normal job cannot take its room.
    rest = [j for j in running if j.id != "low-old"]
    d = schedule_pass(pools, [high, _gpu("n2", 4, at=10)], admitted=rest, preempting=[running[0]])
    assert not d.preempt and not d.admit and "preempted jobs are making room" in d.wait[0].reason
    d = schedule_pass(pools, [high, _gpu("low-old", 4, priority="low", at=0)], admitted=rest)
    assert [a.job_id for a in d.admit] == ["high"]


def test_no_preemption_of_equal_priority_or_of_jobs_still_starting():
    pools = build_pools(CLUSTER)
    running = [_booked(_gpu("same", 4, priority="high")),
               JobView("starting", "a", "low", 0.0, {"gpu": {"GPU": 4.0}}, {"gpu": "gpu-a100"}, preemptible=False)]
    d = schedule_pass(pools, [_gpu("high", 4, priority="high", at=9)], admitted=running)
    assert not d.preempt and d.wait[0].reason.startswith("waiting for 4 GPU")


def test_policies_are_injectable():
    class Fifo:
        def order(self, queued, usage):
            return sorted(queued, key=lambda j: j.submitted_at)

    policies = Policies(placement=BestFit(), order=Fifo(), preemption=LowerPriorityFirst())
    d = schedule_pass(build_pools(CLUSTER), [_gpu("late-high", 8, priority="high", at=2), _gpu("early", 4, at=1)],
                      admitted=[], policies=policies)
    assert [a.job_id for a in d.admit] == ["early"]


def test_best_fit_keeps_the_largest_hole_open():
    free = {"gpu-a100": {"GPU": 8.0, "CPU": 32.0}, "gpu-h100": {"GPU": 2.0, "CPU": 8.0}}
    assert BestFit().place({"gpu": {"GPU": 2.0, "CPU": 1.0}}, free) == {"gpu": "gpu-h100"}
    assert BestFit().place({"gpu-a100": {"GPU": 9.0}}, free) is None
