"""Masking schedules, the forward process, loss terms and training objectives of MD4 / GenMD4."""
