"""Stage 6: the tutorial's quality checklist as plain functions returning results.

One module per family: :mod:`.cases` (domain answers), :mod:`.format`,
:mod:`.memory`, :mod:`.lengths`, :mod:`.edge`. Tests and markers call them;
nothing here needs pytest.
"""
