"""Chinese: normalization (width, punctuation, Traditional -> Simplified), character-counted
filters, SentencePiece without <unk>, BLEU's zh tokenizer, and splits by English sentence."""

import json
import random
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt.data import CleanConfig, PairCleaner, ParallelSplit
from nmt.errors import DataError
from nmt.evaluate import bleu_tokenizer, score_texts
from nmt.files import Manifest, VocabInfo
from nmt.normalize import Normalization, is_chinese, is_cjk, language_normalization
from nmt.prepare import PrepareConfig, prepare
from nmt.tokenizer import UNK, Tokenizer

ZH = language_normalization("zh")


def test_full_width_and_traditional_to_simplified_on_known_examples():
    assert ZH("ＡＢＣ１２３，知識就是力量") == "ABC123，知识就是力量"
    assert ZH("我們說話") == "我们说话"
    assert ZH("電腦ｘｙｚ\u3000好") == "电脑xyz 好"
    assert ZH("你好,世界!你是誰?") == "你好，世界！你是谁？"
    assert ZH("他走了.") == "他走了。"
    assert ZH("版本3.5很好") == "版本3.5很好"  # a period between digits is not a full stop
    # after a letter or digit: before a Han character, or a ! or ? ending a line of Chinese
    assert ZH("这是我的CD,不是吗?") == "这是我的CD，不是吗？" and ZH("为什么要担心Tom?") == "为什么要担心Tom？"
    assert ZH("汤姆每天2:30回家。") == "汤姆每天2:30回家。" and ZH("Is it Tom?") == "Is it Tom?"  # a time; no Chinese
    assert ZH("学会尊敬他(她)。") == "学会尊敬他（她）。" and ZH("版本(v2)很好") == "版本(v2)很好"  # brackets around Chinese
    assert ZH("(我是Tom)") == "（我是Tom）" and ZH("(Tom是我)") == "（Tom是我）" and ZH("(see 图3) (v2)") == "（see 图3） (v2)"
    assert ZH("你好!!") == "你好！！" and ZH("真的?!") == "真的？！" and ZH("你担心Tom?!") == "你担心Tom？！"  # runs whole
    # full-width forms SentencePiece makes ASCII stay so where no rule gives them back
    assert ZH("汤姆每天2：30回家。") == "汤姆每天2:30回家。" and ZH("多赚7％。") == "多赚7%。" and ZH("时候﹐我") == "时候，我"
    assert ZH("他唱“祝你生日快乐”，然后") == "他唱“祝你生日快乐”，然后" and ZH("他唱“快乐”,然后") == "他唱“快乐”，然后"
    for text in ("《红楼梦》，我喜欢", "我读了《红楼梦》！", "他（她）；然后", "【注】：见下", "好……，然后"):  # after closing marks
        assert ZH(text) == text
    assert ZH("占7％，其他") == "占7%，其他" and ZH("增长了7%!") == "增长了7%！"
    assert ZH("他说(“OK”)") == "他说(“OK”)"  # a bracket holding no Chinese keeps both halves ASCII


@pytest.mark.parametrize("text", ["ＡＢＣ１２３，知識就是力量.", "誰？Who? 我們,你們.", "plain English, unchanged.",
                                  "薴麻", "我的CD,Tom的CD?"])  # OpenCC: 薴 -> 苧 -> 苎
def test_chinese_normalization_is_idempotent(text):
    once = ZH(text)
    assert ZH(once) == once


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="我是你好電腦Tom3 ,.!?:;()（）！？，％%“”《》…", max_size=24))
def test_chinese_normalization_of_any_mix_is_idempotent(text):
    once = ZH(text)
    assert ZH(once) == once


def test_other_languages_keep_their_text_and_script_can_stay():
    assert language_normalization("en")("ＡＢＣ 知識,") == "ＡＢＣ 知識,"
    assert not is_chinese("en") and is_chinese("zh") and is_chinese("zh-TW") and is_chinese("cmn")
    assert is_chinese("ZH_TW") and language_normalization("ZH").cjk_punctuation  # codes as users type them
    assert is_chinese("zho") and is_cjk("jpn") and is_cjk("kor")  # Tatoeba's ISO 639-3 names
    assert is_chinese("yue") and is_chinese("hak") and is_chinese("nan") and not is_chinese("nap")  # Sinitic, not Neapolitan
    assert bleu_tokenizer("zho") == "zh" and bleu_tokenizer("jpn") == "ja-mecab"
    traditional = language_normalization("zh", chinese_script="none")
    assert traditional("知識ＡＢＣ") == "知識ABC"


def test_translate_applies_the_recorded_source_normalization(tmp_path):
    vocab = {"src_model": "spm.joint.model", "tgt_model": "spm.joint.model", "src_size": 8, "tgt_size": 8,
             "src_sha256": "x", "tgt_sha256": "x"}
    saved = {"src": ZH.as_dict(), "tgt": Normalization().as_dict()}
    (tmp_path / "vocab.json").write_text(json.dumps({"normalization": saved, "vocab": vocab}))
    assert VocabInfo.read(tmp_path).source_normalization()("知識就是力量") == "知识就是力量"
    # checkpoints from before: a Unicode form only, or nothing at all
    for old in ({"normalization": "NFC"}, {}):
        (tmp_path / "vocab.json").write_text(json.dumps({**old, "vocab": vocab}))
        assert VocabInfo.read(tmp_path).source_normalization()("知識") == "知識"


def test_length_filters_count_characters_for_chinese_and_report_each_reason():
    cleaner = PairCleaner(CleanConfig(max_words=10, max_ratio=3.0), "zh", "en")
    assert cleaner("我很难过。", "I'm sad.") is not None  # 5 characters vs 2 words
    assert cleaner("这是一个非常非常长的句子。", "This is a very very long sentence.") is None  # 13 characters
    assert cleaner("好。", "This is not at all the same length.") is None  # 2 characters vs 8 words
    assert (cleaner.stats.too_long, cleaner.stats.ratio) == (1, 1)
    words = PairCleaner(CleanConfig(max_words=10), "xx", "en")
    assert words("这是一个非常非常长的句子。", "One.") is not None  # counted as one word without a CJK language


def test_bleu_uses_the_zh_tokenizer_for_chinese_targets():
    hyp, ref = ["我们说话。"], ["我们说话了。"]
    (zh,) = score_texts(hyp, ref, ("bleu",), lang="zh")
    assert "tok:zh" in zh.signature
    (detected,) = score_texts(hyp, ref, ("bleu",))  # recognised from the references
    assert "tok:zh" in detected.signature and detected.score == zh.score
    (forced,) = score_texts(hyp, ref, ("bleu",), tokenize="13a", lang="zh")
    assert "tok:13a" in forced.signature and forced.score < zh.score  # one unsplit "word" each
    assert bleu_tokenizer("en") == "13a" and bleu_tokenizer(None, ["Knowledge is power."]) == "13a"


def test_ter_splits_chinese_into_characters_whatever_bleus_tokenizer():
    """Unsplit, a Chinese line is one word, and TER only tells whether it matches exactly."""
    hyp, ref = ["今天天气好。", "我是一个学生。"], ["今天天气很好。", "我是学生。"]
    (ter,) = score_texts(hyp, ref, ("ter",), lang="zh")
    assert "asian:yes" in ter.signature and 20 < ter.score < 40  # 3 edits in 11 characters and punctuation
    (english,) = score_texts(["a b c"], ["a b d"], ("ter",), lang="en")
    assert "asian:no" in english.signature and round(english.score, 2) == 33.33
    for tokenize in ("char", "13a", "none"):  # whatever BLEU's tokenizer: TER's is the language's
        (given,) = score_texts(hyp, ref, ("ter",), tokenize, lang="zh")
        assert (given.score, given.signature) == (ter.score, ter.signature)
    (from_references,) = score_texts(hyp, ref, ("ter",), "char")
    assert (from_references.score, from_references.signature) == (ter.score, ter.signature)


def _toy_zh_corpus(path, seed=0):
    """English sentences, many with two or three Chinese translations (some Traditional)."""
    rng = random.Random(seed)
    chars = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坏兴切故"
    pairs = []
    for i in range(400):
        english = f"sentence number {i} is here."
        for _ in range(rng.randint(1, 3)):
            pairs.append((english, "".join(rng.choice(chars) for _ in range(rng.randint(3, 9))) + "。"))
    return pairs


def _write_tsv(path, pairs):
    path.write_text("".join(f"{en}\t{zh}\n" for en, zh in pairs), encoding="utf-8")


@pytest.fixture(scope="module")
def zh_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("zh")
    _write_tsv(root / "cmn.tsv", _toy_zh_corpus(root))
    prepare(PrepareConfig(
        out_dir=root / "data", src_lang="en", tgt_lang="zh", tsv=root / "cmn.tsv", tsv_langs=("en", "zh"),
        valid_size=40, test_size=40, vocab_size=1200, split_by="en",
    ))
    return root / "data"


def test_split_by_english_keeps_test_and_dev_sentences_out_of_train(zh_data):
    manifest = Manifest.read(zh_data)
    assert manifest.split_by == "en"
    tokenizer = Tokenizer(zh_data / manifest.vocab.src_model, zh_data / manifest.vocab.tgt_model)
    train = ParallelSplit.load(zh_data, "train")
    train_english = set(tokenizer.src.decode([train.src[i].tolist() for i in range(len(train))]))
    for split in ("valid", "test"):
        held = set((zh_data / f"{split}.src.txt").read_text(encoding="utf-8").splitlines())
        assert len(held) >= 10 and not held & train_english
    assert not set((zh_data / "valid.src.txt").read_text().splitlines()) & set((zh_data / "test.src.txt").read_text().splitlines())


def test_unseen_character_is_encoded_without_unk_and_decoded_without_spaces(zh_data):
    manifest = Manifest.read(zh_data)
    assert manifest.vocab.character_coverage == 0.9995
    assert manifest.valid_unk_percent["tgt"] == 0.0
    tokenizer = Tokenizer(zh_data / manifest.vocab.src_model, zh_data / manifest.vocab.tgt_model)
    text = "龘靐齉爩的一是。"  # characters that never occur in the training text, then some that do
    (ids,) = tokenizer.encode_tgt([text])
    assert UNK not in ids
    (decoded,) = tokenizer.decode_tgt([ids])
    assert decoded == text and " " not in decoded
    # Whatever the model writes, decoding puts no space between Chinese characters.
    rng = np.random.default_rng(0)
    regular = [i for i in range(7, tokenizer.tgt_vocab_size) if "▁" not in tokenizer.tgt.id_to_piece(i)]
    words = [i for i in regular if not tokenizer.tgt.id_to_piece(i).startswith("<0x")]  # bytes: controls become spaces
    (random_output,) = tokenizer.decode_tgt([rng.choice(words, size=30).tolist()])
    assert " " not in random_output
    # Byte pieces spell any character, a line break or NUL too: an output line never holds one.
    controls = [tokenizer.tgt.piece_to_id(f"<0x{byte:02X}>") for byte in (0x0A, 0x0D, 0x00, 0x09, 0x1C)]
    assert tokenizer.tgt.decode([regular[0], *controls, regular[1]]).count("\n") == 1
    (decoded,) = tokenizer.decode_tgt([[regular[0], *controls, regular[1]]])
    assert decoded.isprintable() and len(decoded.splitlines()) == 1
    separators = [tokenizer.tgt.piece_to_id(f"<0x{byte:02X}>") for byte in "\u2028\u2029".encode()]  # Python splits lines there
    (decoded,) = tokenizer.decode_tgt([[regular[0], *separators, regular[1]]])
    assert len(decoded.splitlines()) == 1


def test_outputs_keep_the_full_width_punctuation_of_the_references(zh_data):
    from nmt.translate import decode_outputs

    manifest = Manifest.read(zh_data)
    tokenizer = Tokenizer(zh_data / manifest.vocab.src_model, zh_data / manifest.vocab.tgt_model)
    reference = "我们说话，你们听！"  # as prepare writes a Chinese reference
    assert ZH(reference) == reference
    (ids,) = tokenizer.encode_tgt([reference])
    assert tokenizer.decode_tgt([ids]) != [reference]  # SentencePiece's NFKC made the punctuation ASCII
    assert decode_outputs(tokenizer, [ids], manifest.target_normalization()) == [reference]


def test_a_traditional_prefix_is_written_in_the_script_of_the_targets(zh_data):
    from nmt.config import DecodeConfig
    from nmt.translate import encode_lines

    manifest = Manifest.read(zh_data)
    tokenizer = Tokenizer(zh_data / manifest.vocab.src_model, zh_data / manifest.vocab.tgt_model)
    encoded = encode_lines(tokenizer, ["sentence number 1 is here."], DecodeConfig(), prefixes=["我們"],
                           normalize_target=manifest.target_normalization())
    assert encoded.prefixes == tokenizer.encode_tgt(["我们"]) != tokenizer.encode_tgt(["我們"])


def test_normalize_none_turns_every_step_off():
    off = language_normalization("zh", unicode_form="none")
    assert off("ＡＢＣ知識,") == "ＡＢＣ知識,"


def test_japanese_and_korean_bleu_segment_words_with_mecab():
    assert bleu_tokenizer("ja") == "ja-mecab" and bleu_tokenizer("ko") == "ko-mecab" and bleu_tokenizer("zh-TW") == "zh"
    assert bleu_tokenizer(None, ["私は毎朝コーヒーを飲みます。"]) == "ja-mecab"
    assert bleu_tokenizer(None, ["東京大学で経済学を勉強しています。"]) == "ja-mecab"
    assert bleu_tokenizer(None, ["나는 매일 아침 커피를 마십니다."]) == "ko-mecab"
    assert bleu_tokenizer(None, ["我每天早上喝咖啡。"]) == "zh"
    # Unsegmented text: 13a sees one word per sentence, MeCab the words a Japanese reader sees.
    hyp, ref = ["私は毎朝コーヒーを飲む。"], ["私は毎朝コーヒーを飲みます。"]
    japanese = score_texts(hyp, ref, ("bleu",), lang="ja")[0]
    assert "tok:ja-mecab" in japanese.signature and japanese.score > 20
    assert score_texts(hyp, ref, ("bleu",), tokenize="13a")[0].score < 5
    korean = score_texts(["나는 커피를 마신다."], ["나는 커피를 마십니다."], ("bleu",))[0]
    assert "tok:ko-mecab" in korean.signature


def test_translation_input_gets_the_source_normalization(zh_data):
    """Traditional characters reach the model as the Simplified ones it was trained on (which
    SentencePiece's own normalization does not do), as every engine encodes its input."""
    from nmt.config import DecodeConfig
    from nmt.translate import encode_lines

    manifest = Manifest.read(zh_data)
    tokenizer = Tokenizer(zh_data / manifest.vocab.src_model, zh_data / manifest.vocab.tgt_model)
    traditional, simplified = (encode_lines(tokenizer, [text], DecodeConfig(), ZH).sources for text in ("知識", "知识"))
    assert traditional == simplified
    assert encode_lines(tokenizer, ["知識"], DecodeConfig()).sources != simplified  # what the normalization changes


def test_japanese_and_korean_keep_their_text_and_regional_codes_are_read():
    for lang in ("ja", "jpn", "ko", "kor", "ja_JP"):
        assert language_normalization(lang) == Normalization("NFC")
        assert language_normalization(lang)("東京です.") == "東京です."  # no script or punctuation change
    assert is_chinese("zh_TW") and is_cjk("ja_JP") and not is_chinese("ja")
    assert language_normalization("zh_TW").chinese_script == "simplified" and bleu_tokenizer("zh_TW") == "zh"


def test_the_chosen_unicode_form_is_applied():
    assert Normalization("NFKC")("ﬁ①") == "fi1" and Normalization("NFC")("ﬁ①") == "ﬁ①"
    assert len(Normalization("NFD")("é")) == 2 and len(Normalization("NFC")("e\u0301")) == 1


def test_a_period_after_a_character_becomes_a_full_stop_only_where_a_sentence_ends():
    assert ZH("见文件名.txt") == "见文件名.txt"
    assert ZH("他来了.我走了") == "他来了。我走了" and ZH("他来了. 我走了") == "他来了。 我走了"


def test_a_newer_normalization_record_is_read_without_its_new_fields():
    assert Normalization.from_saved({"unicode_form": "NFKC", "added_later": 1}) == Normalization("NFKC")


def test_given_traditional_references_are_written_in_the_script_the_model_writes(tmp_path):
    rng = random.Random(3)
    pairs = [(f"sentence {i} is here.", "們" + "".join(rng.choice("我說話你們聽好的") for _ in range(5)) + "。")
             for i in range(300)]
    for name, part in (("train", pairs[:260]), ("valid", pairs[260:280]), ("test", pairs[280:])):
        (tmp_path / f"{name}.en").write_text("".join(en + "\n" for en, _ in part), encoding="utf-8")
        (tmp_path / f"{name}.zh").write_text("".join(zh + "\n" for _, zh in part), encoding="utf-8")
    prepare(PrepareConfig(out_dir=tmp_path / "data", src_lang="en", tgt_lang="zh", train_prefix=str(tmp_path / "train"),
                          valid_prefix=str(tmp_path / "valid"), test_prefix=str(tmp_path / "test"), vocab_size=400))
    references = (tmp_path / "data" / "test.tgt.txt").read_text(encoding="utf-8").splitlines()
    assert references == [ZH(zh) for _, zh in pairs[280:]] and all(line.startswith("们") for line in references)
    assert (tmp_path / "data" / "test.src.txt").read_text(encoding="utf-8").splitlines() == [en for en, _ in pairs[280:]]
    # Script kept (--chinese-script none): the width and punctuation are still the model's.
    test = [(en, "３" + zh[:-1] + ".") for en, zh in pairs[280:]]  # full-width 3, ASCII full stop
    (tmp_path / "test.zh").write_text("".join(zh + "\n" for _, zh in test), encoding="utf-8")
    prepare(PrepareConfig(out_dir=tmp_path / "kept", src_lang="en", tgt_lang="zh", train_prefix=str(tmp_path / "train"),
                          valid_prefix=str(tmp_path / "valid"), test_prefix=str(tmp_path / "test"), vocab_size=400,
                          clean=CleanConfig(chinese_script="none")))
    references = (tmp_path / "kept" / "test.tgt.txt").read_text(encoding="utf-8").splitlines()
    assert references == ["3" + zh for _, zh in pairs[280:]]  # 們 kept; 3 and 。 as the model writes them


def test_width_folding_makes_ascii_what_sentencepieces_nfkc_makes_ascii():
    """Every full-width and small form of ASCII, and nothing that NFKC keeps or makes otherwise."""
    fold = Normalization(fold_width=True)
    assert fold("０１２３４５６７８９") == "0123456789"
    assert fold("ＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＸＹＺ") == "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    assert fold("ａｂｃｄｅｆｇｈｉｊｋｌｍｎｏｐｑｒｓｔｕｖｗｘｙｚ") == "abcdefghijklmnopqrstuvwxyz"
    assert fold("！＂＃＄％＆＇（）＊＋，－．／：；＜＝＞？＠［＼］＾＿｀｛｜｝～") == "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    assert fold("﹐﹒﹔﹕﹖﹗\u3000") == ",.;:?! "
    assert fold("。、「」“”…①") == "。、「」“”…①"  # Chinese punctuation stays; and what NFKC makes more than one character
    for code in [*range(0xFF01, 0xFF5F), *range(0xFE50, 0xFE6C)]:
        nfkc = unicodedata.normalize("NFKC", chr(code))
        assert fold(chr(code)) == (nfkc if nfkc.isascii() and len(nfkc) == 1 else chr(code)), hex(code)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="我是你好電腦Tom3 ,.!?:;()（）！？，：％%－＂﹐“”「」《》【】。2", max_size=24))
def test_a_model_can_write_its_chinese_references(text):
    """A reference as prepare writes it, through SentencePiece's NFKC (which makes full-width
    punctuation ASCII) and the target normalization of the output, comes back unchanged."""
    reference = ZH(text)
    assert ZH(unicodedata.normalize("NFKC", reference)) == reference


def test_dev_bleu_of_outputs_equal_to_chinese_references_is_100(tmp_path, monkeypatch):
    """Dev BLEU is scored on the output written as nmt translate writes it (target normalization)."""
    import torch
    from conftest import TINY_TRANSFORMER

    from nmt.config import config_from_dict
    from nmt.search import Hypothesis
    from nmt.translation_task import TranslationTask

    rng = random.Random(0)
    chars = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好"
    lines = []
    for i in range(300):
        zh = "".join(rng.choice(chars) for _ in range(4)) + "，" + "".join(rng.choice(chars) for _ in range(4)) + "！"
        lines.append(f"sentence number {i} is here.\t{zh}\n")
    (tmp_path / "c.tsv").write_text("".join(lines), encoding="utf-8")
    data_dir = tmp_path / "data"
    prepare(PrepareConfig(out_dir=data_dir, src_lang="en", tgt_lang="zh", tsv=tmp_path / "c.tsv", tsv_langs=("en", "zh"),
                          valid_size=10, test_size=10, vocab_size=400))
    config = config_from_dict({"data_dir": str(data_dir), "save_dir": str(tmp_path / "m"), "model": TINY_TRANSFORMER,
                               "train": {"valid_max_sentences": 10}})
    task = TranslationTask(config, data_dir, Manifest.read(data_dir))
    assert all("，" in r for r in task.references)
    perfect = [[Hypothesis(ids, 0.0)] for ids in task.tokenizer.encode_tgt(task.references)]
    monkeypatch.setattr("nmt.translation_task.translate_ids", lambda model, sources, *a, **k: perfect[: len(sources)])
    model = task.build_model().eval()
    assert task.validate(model, torch.device("cpu"), torch.float32)["bleu"] == 100.0


def test_japanese_ter_is_counted_in_characters_as_bleu_segments_it():
    from nmt.evaluate import score_texts

    hyp, ref = ["私は毎朝コーヒーを飲む。"], ["私は毎朝コーヒーを飲みます。"]
    (ter,) = score_texts(hyp, ref, ("ter",), lang="ja")
    assert "asian:yes" in ter.signature and ter.score < 50  # unsegmented, the line is one wrong word: 100


def test_bleus_tokenizer_is_recognised_from_the_references_or_given_by_language():
    """Korean: Hangul over a third of the non-space characters; Japanese: Han and kana over a
    third, with kana over a twentieth; Chinese: Han without kana. A given language wins, read
    by its base code."""
    assert bleu_tokenizer(None, ["한국어 문장 abcdefg"]) == "ko-mecab"  # 5 Hangul of 12 letters
    assert bleu_tokenizer(None, ["漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字のは"]) == "ja-mecab"  # 2 kana of 20
    assert bleu_tokenizer(None, ["我们 说 话 a b c d e"]) == "zh"  # 4 Han of 9 letters, spaces not counted
    assert bleu_tokenizer("ja-JP", ["我们说话"]) == "ja-mecab" and bleu_tokenizer("ko_KR", None) == "ko-mecab"
    assert bleu_tokenizer(None, ["我们说话我们说话我们说话我们说话我们说话我们说话我们说话的时候の"]) == "zh"  # 1 kana of 32: a stray one
    assert score_texts(["我们说话"], ["我们说话"], ("bleu",), lang="ja")[0].signature.count("tok:ja-mecab") == 1


def test_score_reports_give_each_signature_and_name_the_directions_of_each():
    from nmt.evaluate import DirectionReport, DirectionScores, Score, ScoreReport

    bleu = Score("bleu", 12.345678, "tok:13a", "BLEU = 12.35 ...")
    assert ScoreReport([bleu]).text() == "BLEU = 12.35 ...\n  signature: tok:13a"
    assert ScoreReport([bleu]).as_json()[0]["score"] == 12.3457
    chinese = Score("bleu", 30.0, "tok:zh", "BLEU = 30.00 ...")
    mixed = DirectionReport([DirectionScores("de-en", [bleu]), DirectionScores("en-zh", [chinese])]).text()
    assert "bleu signature (de-en): tok:13a" in mixed and "bleu signature (en-zh): tok:zh" in mixed
    one = DirectionReport([DirectionScores("de-en", [bleu]), DirectionScores("fr-en", [bleu])]).text()
    assert "bleu signature: tok:13a" in one  # one tokenizer for all: not named per direction
    ten = Score("bleu", 10.0, "tok:13a", "")
    report = DirectionReport([DirectionScores("aa-bb", [ten]), DirectionScores("bb-cc", [ten], zero_shot=True)]).text()
    assert [line.split()[:2] for line in report.splitlines() if line.startswith("mean")] == [["mean", "trained"], ["mean", "zero-shot"]]
    assert "* zero-shot: a direction the model was not trained on" in report
    rows = {line.split()[0]: line.split()[1] for line in report.splitlines()[1:3]}
    assert rows == {"aa-bb": "10.00", "bb-cc": "*"}  # the zero-shot direction marked in its row
    with pytest.raises(DataError, match="2 hypotheses but 1 references"):
        score_texts(["a", "b"], ["a"])
