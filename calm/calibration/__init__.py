"""Calibration: Learn-then-Test statistics (ltt), the calibration table a checkpoint stores (table), and
the knob that turns a speed, tolerance or threshold into an exit policy (knob).

May import calm.errors, calm.adapters, calm.exits and calm.engine; never the model facade."""
