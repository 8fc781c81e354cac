"""calm.eval: what the `calm` commands run, as library code.

- inputs: documents from a JSONL file, a text file, stdin or a string.
- summarize: summaries of documents in batches, with exit layers per token.
- render: summaries coloured by exit layer (rich) or annotated in plain text.
- rouge: ROUGE-1/2/L F1 with rouge-score.
- sweep: the threshold sweep of `calm eval` (resumable, shardable with accelerate).
- report: eval.json, eval.md and the two plots.
"""

from calm.eval.inputs import load_documents
from calm.eval.summarize import DocumentSummary, summarize_documents
from calm.eval.sweep import EvalConfig, run_eval

__all__ = ["DocumentSummary", "EvalConfig", "load_documents", "run_eval", "summarize_documents"]
