"""Generalizing a provisioned guest (deprovision), each step's claim checked in the guest."""
