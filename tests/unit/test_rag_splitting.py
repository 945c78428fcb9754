"""Documents to chunks (rag/splitting.py): sizes, overlap, sentence ends, headings, metadata."""

from __future__ import annotations

import itertools
import random

from langchain_core.documents import Document

from chatfleet.rag.splitting import split_documents

WORDS = ["gateway", "queue", "replica", "engine", "token", "latency", "vector", "index", "chunk",
         "answer", "question", "policy", "scale", "cold", "start", "prompt", "cache", "batch",
         "slot", "drain", "metric"]


def _english(chars: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    sentences: list[str] = []
    while sum(len(s) + 1 for s in sentences) < chars:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)[:chars]


def _chinese(sentences: int) -> str:
    clauses = ["网关根据队列长度扩容", "每个副本最多处理八个请求", "冷启动大约需要九十秒",
               "知识库的文件被切成小块", "检索结果按相关度排序"]
    rng = random.Random(2)
    return "".join(f"第{i}句，{rng.choice(clauses)}，{rng.choice(clauses)}。" for i in range(sentences))


def test_a_5000_character_text_becomes_chunks_of_at_most_750_that_overlap() -> None:
    text = _english(5000)
    result = split_documents([Document(page_content=text, metadata={"source": "a.txt"})],
                             file_name="a.txt")
    chunks = [chunk.page_content for chunk in result.chunks]
    assert result.splitter == "RecursiveCharacterTextSplitter"
    assert len(chunks) >= 7
    assert all(0 < len(chunk) <= 750 for chunk in chunks)
    for before, after in itertools.pairwise(chunks):
        shared = max(n for n in range(151) if before.endswith(after[:n]))
        assert shared >= 20, (before[-60:], after[:60])
    # Nothing is lost: every sentence of the text is in some chunk.
    for sentence in text.split(". ")[:-1]:
        assert any(sentence in chunk for chunk in chunks)


def test_chunks_are_numbered_0_to_n_minus_1_across_the_documents_of_a_file() -> None:
    pages = [Document(page_content=_english(1600, seed=page), metadata={"page": page})
             for page in range(3)]
    chunks = split_documents(pages, file_name="r.pdf").chunks
    assert [chunk.metadata["chunk"] for chunk in chunks] == list(range(len(chunks)))
    assert [chunk.metadata["page"] for chunk in chunks] == sorted(
        chunk.metadata["page"] for chunk in chunks)


def test_each_chunk_keeps_its_documents_metadata_without_changing_the_original() -> None:
    metadata = {"source": "r.pdf", "page": 4, "total_pages": 9}
    document = Document(page_content=_english(2000), metadata=metadata)
    chunks = split_documents([document], file_name="r.pdf").chunks
    assert all(chunk.metadata == {**metadata, "chunk": i} for i, chunk in enumerate(chunks))
    assert document.metadata == {"source": "r.pdf", "page": 4, "total_pages": 9}


def test_chinese_text_is_cut_after_a_full_stop_so_sentences_stay_whole_and_overlap_whole() -> None:
    text = _chinese(120)
    chunks = split_documents([Document(page_content=text)], file_name="说明.txt").chunks
    assert len(chunks) >= 3
    assert all(len(chunk.page_content) <= 750 for chunk in chunks)
    assert all(chunk.page_content.endswith("。") for chunk in chunks)
    assert all(chunk.page_content.startswith("第") for chunk in chunks)
    for before, after in itertools.pairwise(chunks):  # overlap by whole sentences
        assert after.page_content.split("。")[0] + "。" in before.page_content


def test_chunk_size_and_overlap_are_the_callers() -> None:
    text = _english(3000)
    chunks = split_documents([Document(page_content=text)], chunk_size=200, chunk_overlap=0,
                             file_name="a.txt").chunks
    assert all(len(chunk.page_content) <= 200 for chunk in chunks)
    assert len(chunks) >= 15


def test_markdown_is_cut_at_headings_each_chunk_starting_with_its_section_heading() -> None:
    sections = [f"## Section {i}\n\n" + _english(450, seed=i) for i in range(5)]
    markdown = "# Guide\n\nIntro line.\n\n" + "\n\n".join(sections)
    result = split_documents([Document(page_content=markdown)], file_name="guide.md")
    texts = [chunk.page_content for chunk in result.chunks]
    assert result.splitter == "RecursiveCharacterTextSplitter"
    assert [text.splitlines()[0] for text in texts[1:]] == [f"## Section {i}" for i in range(1, 5)]
    assert texts[0].startswith("# Guide") and "## Section 0" in texts[0]


def test_markdown_chunks_carry_the_headings_in_force_where_they_start() -> None:
    markdown = ("# Guide\n\nIntro.\n\n## Install\n\n```bash\n# a comment, not a heading\n"
                + "\n".join(f"echo {i}" for i in range(35, 70)) + "\n```\n\n### Laptop\n\n"
                + _english(900) + "\n")
    chunks = split_documents([Document(page_content=markdown, metadata={"source": "g.md"})],
                             chunk_size=300, chunk_overlap=0, file_name="g.md").chunks
    def headings_of(marker: str) -> list[list[str]]:
        return [c.metadata["headings"] for c in chunks if c.page_content.startswith(marker)]

    assert headings_of("# Guide") == [["Guide"]]
    assert headings_of("# a comment") == [["Guide", "Install"]]  # in a code block: no heading
    assert headings_of("echo 69") + headings_of("```") == [["Guide", "Install"]] * 2
    assert headings_of("### Laptop") == [["Guide", "Install", "Laptop"]]
    assert chunks[-1].metadata == {"source": "g.md", "chunk": len(chunks) - 1,
                                   "headings": ["Guide", "Install", "Laptop"]}


def test_only_markdown_chunks_get_headings() -> None:
    text = "# Not a heading in a text file\n\n" + _english(1000)
    for name in ("notes.txt", "preface.md"):
        document = Document(page_content=text if name.endswith(".txt") else _english(1000))
        assert all("headings" not in chunk.metadata
                   for chunk in split_documents([document], file_name=name).chunks)


def test_csv_rows_are_never_merged_into_one_chunk() -> None:
    rows = [Document(page_content=f"question: q{i}\nanswer: a{i}", metadata={"row": i})
            for i in range(10)]
    chunks = split_documents(rows, file_name="faq.csv").chunks
    assert [chunk.page_content for chunk in chunks] == [row.page_content for row in rows]
    assert [chunk.metadata for chunk in chunks] == [{"row": i, "chunk": i} for i in range(10)]


def test_a_long_csv_row_is_split_on_its_own() -> None:
    rows = [Document(page_content="answer: " + _english(1200)), Document(page_content="answer: x")]
    chunks = split_documents(rows, file_name="faq.csv").chunks
    assert len(chunks) >= 3 and chunks[-1].page_content == "answer: x"


def test_documents_and_chunks_with_only_whitespace_are_dropped() -> None:
    documents = [Document(page_content="  \n\n "), Document(page_content="Real text."),
                 Document(page_content="")]
    chunks = split_documents(documents, file_name="x.pdf").chunks
    assert [(chunk.page_content, chunk.metadata["chunk"]) for chunk in chunks] == [
        ("Real text.", 0)]
