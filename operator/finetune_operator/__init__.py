"""finetune_operator: the kopf operator for FineTuneJob (issue: the operator).

It may import `finetune_trainer.spec` (pydantic only) and nothing else of the trainer; the
trainer never imports this package (tests/unit/test_architecture.py).
"""
