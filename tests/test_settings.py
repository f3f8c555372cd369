import pytest

from jwth.settings import ENV_DATA_ROOT, data_root, dataset_dir


def test_env_var_wins_and_bad_value_is_explained(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    monkeypatch.setenv(ENV_DATA_ROOT, str(tmp_path))
    assert data_root() == tmp_path.resolve()
    assert dataset_dir("mine") == tmp_path.resolve() / "mine"
    with pytest.raises(FileNotFoundError, match="available: \\['mine'\\]"):
        dataset_dir("tcga_crc_msi")
    monkeypatch.setenv(ENV_DATA_ROOT, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=ENV_DATA_ROOT):
        data_root()
