"""Constants shared by the compress entry point and its stage wiring (no flags, no TF)."""

CRITERIA = ("l1", "l2", "bn_gamma", "taylor", "fpgm", "random")
STRATEGIES = ("default", "mirrored")
ALL_FORMATS = ("saved_model", "tflite", "tflite_f16", "tflite_dynamic", "tflite_int8", "onnx")
# The method's three steps are the stages compress (Method.prune), finetune
# (Method.finetune) and strip (Method.finalize): the order Method.compress runs.
STAGES = ("teacher", "compress", "finetune", "strip", "export", "verify", "latency", "report")

# Flags each stage depends on; a stage also depends on every earlier stage's
# flags. Changing one of a finished stage's flags invalidates that stage.
STAGE_FLAGS = {
    "teacher": ("teacher", "dataset", "teacher_epochs", "teacher_lr", "batch_size", "seed"),
    "compress": (
        "student", "method", "target_macs_reduction", "criterion", "round_to", "compress_epochs",
        "lr", "temperature", "compress_train_subset", "strategy",
    ),
    "finetune": ("finetune_epochs",),
    "strip": (),
    "export": ("formats",),
    "verify": ("verify_samples",),
    "latency": ("threads", "latency_repeat"),
    "report": (),
}
