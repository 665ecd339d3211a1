"""The knowledge-graph demo: ``demo`` (the demo graph's entities, their splits and the judged
entity accuracy, ``dev kg demo-eval``) and ``finetune_demo`` (fine-tuning the demo model on entity
captions with injection, ``dev kg demo-finetune``).
"""
