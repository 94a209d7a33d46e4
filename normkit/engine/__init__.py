"""Training engine: trainer and hooks, optimizer groups, LR schedules, checkpoints, distributed setup, config."""
from normkit.engine.checkpoint import (  # noqa: F401
    Checkpointer, atomic_save, capture_rng_state, load_checkpoint, non_finite_entries, restore_rng_state)
from normkit.engine.config import apply_overrides, load_config  # noqa: F401
from normkit.engine.distributed import (  # noqa: F401
    DistInfo, all_gather_objects, broadcast_object, move_to_device, barrier, convert_sync_norm, destroy_distributed,
    get_rank, get_world_size, init_distributed, is_main_process, mean_over_ranks, seed_all, setup_logging, unwrap_model,
    wrap_ddp)
from normkit.engine.hooks import (  # noqa: F401
    EvalHook, MetricsWriter, PeriodicCheckpointer, ProgressBar, has_evaluation_record)
from normkit.engine.lr_scheduler import (  # noqa: F401
    IterationLRScheduler, PolyLR, WarmupStepLR, build_lr_scheduler, scale_to_total_batch)
from normkit.engine.optimizer import build_optimizer, build_param_groups  # noqa: F401
from normkit.engine.trainer import AMP_DTYPES, HookBase, Trainer  # noqa: F401
