"""simko.registry.Registry: register, get, build, names, discovery by package scan (eager or lazy), and the five
registries built on it (losses, verifiers, rollout engines, advantage estimators, solution keys)."""

import subprocess
import sys
import textwrap

import pytest

from simko.registry import Registry


def write_package(root, name: str, modules: dict[str, str]) -> None:
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module, source in modules.items():
        (package / f"{module}.py").write_text(textwrap.dedent(source))


def test_register_get_build_names_and_errors():
    shapes = Registry("shape", config_key="model.shape")

    @shapes.register("square")
    class Square:
        def __init__(self, side=1):
            self.side = side

    shapes.register("double")(lambda x: 2 * x)
    assert Square.name == "square"  # a class learns its name
    assert shapes.get("square") is Square and shapes["square"] is Square
    assert shapes.build("square", side=3).side == 3 and shapes.build("double", 4) == 8
    assert shapes.names() == ["double", "square"] and list(shapes) == ["double", "square"] and len(shapes) == 2
    assert "square" in shapes and "circle" not in shapes and 3 not in shapes
    assert shapes.get("circle", None) is None
    with pytest.raises(ValueError, match=r"^unknown shape 'circle' \(model.shape\); available: double, square$"):
        shapes.get("circle")
    with pytest.raises(ValueError, match="shape 'square' registered twice"):
        shapes.register("square")(object)
    shapes.unregister("double")
    assert shapes.names() == ["square"]


def test_prepare_checks_and_wraps_what_is_registered():
    def only_ints(obj, scale=1):
        if not isinstance(obj, int):
            raise TypeError(f"{obj!r} is not an int")
        return obj * scale

    numbers = Registry("number", prepare=only_ints)
    assert numbers.register("six", scale=2)(3) == 3  # the decorator returns the object unchanged
    assert numbers.get("six") == 6  # the registry holds what prepare made of it
    with pytest.raises(TypeError, match="not an int"):
        numbers.register("text")("x")
    assert numbers.names() == ["six"]


def test_discovery_imports_every_module_of_the_package_on_first_lookup(tmp_path, monkeypatch):
    """No import list: every module of the scanned package is imported once, at the first lookup."""
    write_package(
        tmp_path,
        "plugins_eager",
        {
            "registry_home": "from simko.registry import Registry\nTHINGS = Registry('thing', ('plugins_eager',))\n",
            "one": "from plugins_eager.registry_home import THINGS\nTHINGS.register('one')(1)\n",
            "two": "from plugins_eager.registry_home import THINGS\n"
            "THINGS.register('two')(2)\nTHINGS.register('too')(2)\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from plugins_eager.registry_home import THINGS

    assert "plugins_eager.one" not in sys.modules  # nothing imported before a lookup
    assert THINGS.names() == ["one", "too", "two"]
    assert THINGS.get("too") == 2
    with pytest.raises(ValueError, match="unknown thing 'three'; available: one, too, two"):
        THINGS.get("three")


def test_a_module_that_fails_to_import_fails_every_lookup(tmp_path, monkeypatch):
    write_package(
        tmp_path,
        "plugins_broken",
        {
            "registry_home": "from simko.registry import Registry\nTHINGS = Registry('thing', ('plugins_broken',))\n",
            "broken": "raise RuntimeError('broken plug-in')\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from plugins_broken.registry_home import THINGS

    for _ in range(2):
        with pytest.raises(RuntimeError, match="broken plug-in"):
            THINGS.names()


def test_a_lazy_registry_imports_only_the_module_asked_for(tmp_path, monkeypatch):
    """Lazy (the engines): names are the package's modules, listed without importing them; ``get(name)`` imports
    that one module only, so a module whose import fails (a missing optional package) costs nothing until asked."""
    write_package(
        tmp_path,
        "plugins_lazy",
        {
            "base": "from simko.registry import Registry\n"
            "ENGINES = Registry('engine', ('plugins_lazy',), lazy=True, skip=('base',))\n",
            "light": "from plugins_lazy.base import ENGINES\n@ENGINES.register('light')\nclass Light: pass\n",
            "heavy": "import a_package_that_is_not_installed\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from plugins_lazy.base import ENGINES

    assert ENGINES.names() == ["heavy", "light"] and "heavy" in ENGINES
    assert "plugins_lazy.light" not in sys.modules and "plugins_lazy.heavy" not in sys.modules
    assert ENGINES.get("light").name == "light"
    assert "plugins_lazy.heavy" not in sys.modules
    with pytest.raises(ModuleNotFoundError, match="a_package_that_is_not_installed"):
        ENGINES.get("heavy")
    with pytest.raises(ValueError, match="unknown engine 'nope'; available: heavy, light"):
        ENGINES.get("nope")
    with pytest.raises(ValueError, match="exactly one package"):
        Registry("engine", lazy=True)


def test_the_five_registries_share_the_idiom():
    from simko.advantages import ADVANTAGES, register_advantage
    from simko.engines import ENGINES, register_engine
    from simko.losses import LOSSES, register_loss
    from simko.metrics.diversity import SOLUTION_KEYS, register_solution_key
    from simko.rewards import VERIFIERS, register_verifier

    for registry in (ADVANTAGES, ENGINES, LOSSES, SOLUTION_KEYS, VERIFIERS):
        assert isinstance(registry, Registry)
    assert register_loss == LOSSES.register and register_engine == ENGINES.register
    assert callable(register_verifier) and callable(register_advantage) and callable(register_solution_key)
    assert {"cispo", "clip_cov", "grpo", "gspo", "kl_cov", "simko"} <= set(LOSSES.names())
    assert {"math", "exact", "countdown", "knights_knaves", "mini_sudoku", "countdown_steps"} <= set(VERIFIERS)
    assert {"grpo", "psr", "nsr", "w_reinforce", "passk"} <= set(ADVANTAGES)
    assert "countdown_steps" in SOLUTION_KEYS
    assert {"hf", "vllm"} <= set(ENGINES.names())
    with pytest.raises(ValueError, match=r"unknown loss 'bogus' \(loss.name\); available: cispo, clip_cov"):
        LOSSES.get("bogus")
    with pytest.raises(TypeError, match="PolicyLoss subclass"):
        register_loss("test_not_a_loss")(object)
    with pytest.raises(TypeError, match="RolloutEngine subclass"):
        register_engine("test_not_an_engine")(object)


def test_engines_check_their_knobs_on_the_base_class():
    from simko.engines import RolloutEngine, check_engine
    from simko.engines.hf import HFEngine

    assert "check" in vars(RolloutEngine)  # the optional start-up check has a default on the base class
    check_engine("hf", {})
    with pytest.raises(TypeError, match=r"unknown rollout.hf knobs \['kv_cache_gib'\]; the hf engine's knobs: none"):
        check_engine("hf", {"kv_cache_gib": 1})
    with pytest.raises(TypeError, match="unknown rollout.hf knobs"):
        HFEngine.check(bogus=1)


def test_no_engine_module_is_imported_until_asked_for():
    """``import simko.engines`` (and the module, the trainer's entry point) import no engine; asking for ``hf``
    imports that one, never vLLM."""
    code = textwrap.dedent(
        """
        import sys
        import simko.engines, simko.module, simko.train, simko.eval
        before = sorted(m for m in sys.modules if m.startswith("simko.engines."))
        from simko.engines import ENGINES, check_engine
        check_engine("hf")
        names = ENGINES.names()
        after = sorted(m for m in sys.modules if m.startswith("simko.engines."))
        print(before, after, "vllm" in sys.modules, names)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    before, after = "['simko.engines.base']", "['simko.engines.base', 'simko.engines.hf']"
    assert out.splitlines()[-1] == f"{before} {after} False ['hf', 'vllm']"
