"""Time: durations, triggers, watermarks, windows, processing time."""
