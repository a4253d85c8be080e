"""What crosses a process boundary: the control messages, encoded values, errors as values."""
