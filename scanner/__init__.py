"""The mock scanner: publishes scan results with the reference scanner's distribution."""
