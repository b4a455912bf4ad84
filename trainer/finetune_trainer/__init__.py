"""finetune_trainer: the FineTuneJob spec and the trainer that runs it (DeepSpeed ZeRO on Ray).

Only `finetune_trainer.spec` is light (pydantic); everything else imports torch, Ray and
DeepSpeed lazily so that the operator image can use the spec without them.
"""

__version__ = "0.1.0"
