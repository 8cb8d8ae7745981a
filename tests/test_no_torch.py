"""The edge install has no torch: runtime (and the server) must import and score without it."""
import subprocess
import sys
import textwrap


def test_runtime_imports_with_torch_unimportable():
    code = textwrap.dedent("""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None
        sys.meta_path.insert(0, BlockTorch())
        import runtime
        from runtime import Scorer, featurize
        f = featurize([{"ts": 1, "event": "view", "item_id": "a", "category": "c", "price": 1.0}], runtime.FeatureSpec(), now=2)
        assert f["event_ids"].shape == (1, 2)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
