"""The training engine of the deep detectors: each detector describes its training once
(`TorchDetector._stage_plans`: `StagePlan`, `Phase`, `ParamGroup`, `OptimiserSpec`), and one loop
trains K >= 1 jobs from that description (`fit_jobs`).

Modules, one concern each: plan (the description), optimisers (torch.optim for one job, the
stacked Adam / RMSprop for K), modules (one job's modules called directly, or K stacked and
vmapped), jobs (per-job RNG streams, draws, lockstep minibatches, divergence monitors), graphs
(CUDA-graph capture of a phase), loop (the stage loop), fit (`fit_jobs`).
"""
from methods.engine.fit import fit_jobs
from methods.engine.modules import in_vmap
from methods.engine.optimisers import OptimiserSpec
from methods.engine.plan import Job, ParamGroup, Phase, Stage, StagePlan, StageResult, StepEvent

__all__ = ["fit_jobs", "in_vmap", "OptimiserSpec", "Job", "ParamGroup", "Phase", "Stage", "StagePlan",
           "StageResult", "StepEvent"]
