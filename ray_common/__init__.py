"""Ray code that `serve` and `train` both need, and neither owns: the local Ray node they start, and the bounded,
explained wait for Ray to place their actors. Neither imports the other's package for it; this one imports
neither."""
