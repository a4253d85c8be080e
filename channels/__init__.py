"""The data plane: shared-memory segments and serialization; knows no DAGs, actors or refs."""
