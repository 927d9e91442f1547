"""placeholder"""
class DataConfigError(ValueError):
    pass
