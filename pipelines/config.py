"""Constants shared by the compress entry point and its stage wiring (no flags, no TF)."""

CRITERIA = ("l1", "l2", "bn_gamma", "taylor", "fpgm", "hessian", "random")
STRATEGIES = ("default", "mirrored", "multiworker")
# Keras dtype policies of --mixed_precision ("none": float32); tfkdp.runtime.MIXED_PRECISION.
MIXED_PRECISION = ("none", "mixed_float16", "mixed_bfloat16")
ALL_FORMATS = (
    "saved_model", "tflite", "tflite_f16", "tflite_dynamic", "tflite_int8", "tflite_sparse", "onnx",
)
# The method's three steps are the stages compress (Method.prune), finetune
# (Method.finetune) and strip (Method.finalize): the order Method.compress runs.
STAGES = ("teacher", "compress", "finetune", "strip", "export", "verify", "latency", "report")

# Folder (under output_dir) of the methods' resumable state within a stage.
RESUME_DIR = ".resume"

# Flags of single methods (their `pipeline_options` read them); all belong to
# the compress stage.
METHOD_FLAGS = (
    "admm_rho_initial", "admm_rho_final",
    "dean_every", "dean_lr", "dean_distill_max", "dean_sparsity_max",
    "mskd_criteria", "mskd_allocations", "mskd_top_k", "mskd_select_steps",
    "pdc_epsilon",
    "weight_order", "target_sparsity",
    "cascade_num_tas", "cascade_levels", "cascade_stage2_epochs",
)

# Flags each stage depends on; a stage also depends on every earlier stage's
# flags. Changing one of a finished stage's flags invalidates that stage.
STAGE_FLAGS = {
    "teacher": (
        "teacher", "dataset", "image_size", "color_mode", "teacher_epochs", "teacher_lr",
        "batch_size", "seed", "mixed_precision", "input_scaling",
    ),
    "compress": (
        "student", "method", "target_macs_reduction", "target_latency_ms", "target_latency_reduction",
        "latency_runtime",
        "latency_threads", "criterion", "round_to", "compress_epochs",
        "lr", "temperature", "compress_train_subset", "strategy",
        *METHOD_FLAGS,
    ),
    "finetune": ("finetune_epochs",),
    "strip": (),
    "export": ("formats", "bake_preprocessing"),
    "verify": ("verify_samples", "strict_verify"),
    "latency": ("threads", "latency_repeat"),
    "report": (),
}
