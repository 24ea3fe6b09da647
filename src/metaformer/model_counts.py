"""Parameters, frozen parameters and MACs at 224x224 of every registered model, counted once so that
``metaformer models`` answers at once (building and counting every model takes a minute).

tests/test_model_counts.py recounts every row (``report.count_model``) and prints the row to paste
when a model changes or is added.
"""

MODEL_COUNTS: dict[str, tuple[int, int, int]] = {
    "caformer_b36": (98_753_614, 0, 23_221_333_760),
    "caformer_m36": (56_204_878, 0, 13_286_273_856),
    "caformer_s18": (26_341_656, 0, 4_125_205_760),
    "caformer_s36": (39_297_102, 0, 8_004_538_112),
    "convformer_b36": (99_882_616, 0, 22_690_270_976),
    "convformer_m36": (57_051_640, 0, 12_887_976_768),
    "convformer_s18": (26_774_448, 0, 3_959_248_640),
    "convformer_s36": (40_012_152, 0, 7_672_623_872),
    "identityformer_m36": (56_077_168, 0, 8_805_831_936),
    "identityformer_m48": (73_346_056, 0, 11_594_664_192),
    "identityformer_s12": (11_891_712, 0, 1_825_378_048),
    "identityformer_s24": (21_341_464, 0, 3_415_606_016),
    "identityformer_s36": (30_791_216, 0, 5_005_833_984),
    "metaformer_id_s12": (11_915_176, 0, 1_822_678_528),
    "metaformer_ppaa_s12_224": (16_535_592, 0, 2_559_563_264),
    "metaformer_ppff_s12_224": (12_150_474, 0, 1_898_895_872),
    "metaformer_pppa_s12_224": (14_038_440, 0, 1_930_356_224),
    "metaformer_pppf_s12_224": (11_919_978, 0, 1_825_137_152),
    "poolformer_m36": (56_172_520, 0, 8_801_876_736),
    "poolformer_m48": (73_473_448, 0, 11_590_708_992),
    "poolformer_s12": (11_915_176, 0, 1_822_678_528),
    "poolformer_s24": (21_388_968, 0, 3_412_906_496),
    "poolformer_s36": (30_862_760, 0, 5_003_134_464),
    "poolformerv2_m36": (56_077_168, 0, 8_805_831_936),
    "poolformerv2_m48": (73_346_056, 0, 11_594_664_192),
    "poolformerv2_s12": (11_891_712, 0, 1_825_378_048),
    "poolformerv2_s24": (21_341_464, 0, 3_415_606_016),
    "poolformerv2_s36": (30_791_216, 0, 5_005_833_984),
    "randformer_m36": (56_783_062, 705_894, 9_082_427_136),
    "randformer_m48": (74_287_248, 941_192, 11_963_457_792),
    "randformer_s12": (12_127_010, 235_298, 1_901_595_392),
    "randformer_s24": (21_812_060, 470_596, 3_568_040_704),
    "randformer_s36": (31_497_110, 705_894, 5_234_486_016),
}
