"""Fixtures for the tests, the demo and the benchmarks: tiny random model folders (`tiny`), the toy
video task (`toy`) and the plain diffusers-module DMD2 step (`dmd2_reference`). Nothing in the
library imports them."""
