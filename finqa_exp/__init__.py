"""finqa-exp: find the best 4-bit LoRA fine-tune of a small LLM for financial Q&A.

One trial: ``python -m finqa_exp``; a sweep: ``python -m finqa_exp -m``.
"""

__version__ = "0.1.0"
