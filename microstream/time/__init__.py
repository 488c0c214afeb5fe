"""Time: durations, triggers, watermarks, windows."""
