"""Studies that use jitrope, beside the library: each folder holds its plans (data files) and a short driver."""
