"""Run control: the settings a run resolves (settings, with the layer/epochs search in autotune), token chunks
for large vocabularies (chunks), checkpoints and resume (checkpoint), several processes (distributed), the
record of which implementation actually ran (observed) and the command line's process settings (process)."""
