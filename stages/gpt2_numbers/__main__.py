"""gpt2_numbers: the path patching paper's GPT-2 experiment ("the next token is a number", heads 5.6 and 6.1)
against causal tracing and zero ablation -> <folder>/metrics/gpt2_numbers.json, <folder>/plots/gpt2_numbers.png

Not part of the default pipeline: it needs GPT-2's weights in the local Hugging Face cache. This folder is a
nested DVC project, so the top-level `dvc repro` and `dvc status` neither run nor report it:

    cd stages/gpt2_numbers && dvc repro          # runs `python -m stages.gpt2_numbers stages/gpt2_numbers`

from the project root, so that this checkout's probegen is the one imported. Parameters: <folder>/params.yaml
`gpt2_numbers` (keys and defaults: probegen.patching.gpt2_numbers.NumbersConfig).
"""

from probegen.cli import stage

if __name__ == "__main__":
    stage("gpt2-numbers")
