"""Lossless speculative decoding: drafting from the exit heads and verifying with the full model
(drafting), drafts looked up in the context (lookup), drafting that stops per row where it does not pay
(goodput), the rule that picks the lossless run (lossless), and
the options a caller asks for it with (options).

May import calm.errors, calm.adapters, calm.exits, calm.engine and calm.calibration; never the model
facade."""
