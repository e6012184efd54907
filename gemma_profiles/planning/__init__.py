"""Planning: Profile + hardware + variant -> `Plan`, with a memory estimate (no torch).

``hardware`` is the typed description of a machine; ``memory`` estimates what gemma_pytorch
allocates; ``plan`` decides every change and says why; ``auto`` is the profile built from
detected hardware; ``new_profile`` writes a new machine's profile for ``gemma-profile new``.
"""
