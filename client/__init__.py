"""tierserve's Python client SDK (the `digits` router client comes with the router).

Until then, any Triton client works: see the README's "Calling a model".
"""
