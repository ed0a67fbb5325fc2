"""Triton Python-backend models. Each model.py in a repository re-exports one of these classes; they map Triton
tensors to mstriton calls and hold no logic of their own. Importable only inside the Python backend's stub,
where `triton_python_backend_utils` exists."""
