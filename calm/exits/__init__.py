"""Exit decisions: the exit heads and classifier (heads), the confidence measures (confidence) and the
`ExitPolicy` that says when a token may leave the stack (policy).

May import calm.errors and calm.adapters only."""
