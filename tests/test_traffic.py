"""bench/traffic.py's table: compressions keep two digits below 10, so an exchange that moves
more than the ring (allgather at 1024 ranks) does not read as 1x."""

import traffic  # bench/traffic.py


def test_compression_column_keeps_two_digits_below_ten():
    assert traffic._ratio(402.41 / 696.222) == "0.58"
    assert traffic._ratio(402.01 / 348.111) == "1.2"
    assert traffic._ratio(396.51 / 43.514) == "9.1"
    assert traffic._ratio(148.1) == "148"
