"""kvmw subpackage."""
