"""NMEA 0183: real sentences with their checksums (published receiver output) decode fully."""

from __future__ import annotations

import pytest

from drivers.serial.nmea import NmeaError, checksum, parse_sentence

GGA = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
RMC = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"


def test_checksum_of_classic_gga() -> None:
    body = GGA[1 : GGA.index("*")]
    assert checksum(body) == 0x47


def test_gga_decodes_every_field() -> None:
    s = parse_sentence(GGA + "\r\n")
    assert (s.talker, s.type) == ("GP", "GGA")
    assert s.ts is None
    assert s.values == {
        "gga.time": "12:35:19",
        "gga.lat": pytest.approx(48 + 7.038 / 60),
        "gga.lon": pytest.approx(11 + 31.0 / 60),
        "gga.quality": 1,
        "gga.satellites": 8,
        "gga.hdop": 0.9,
        "gga.altitude": 545.4,
        "gga.geoid_separation": 46.9,
        "gga.dgps_age": None,
        "gga.dgps_station": None,
    }


def test_gga_southern_hemisphere_negative_altitude() -> None:
    s = parse_sentence("$GPGGA,084048,2727.9531,S,15305.3447,E,1,07,02.0,-00001.0,M,039.4,M,,*70")
    assert s.values["gga.lat"] == pytest.approx(-(27 + 27.9531 / 60))
    assert s.values["gga.lon"] == pytest.approx(153 + 5.3447 / 60)
    assert s.values["gga.altitude"] == -1.0
    assert s.values["gga.satellites"] == 7


def test_gga_rtk_fix_with_dgps_station() -> None:
    s = parse_sentence(
        "$GNGGA,140416.00,5948.99861,N,01021.67811,E,4,12,0.59,192.9,M,39.4,M,1.0,1405*68"
    )
    assert s.talker == "GN"
    assert s.values["gga.time"] == "14:04:16.00"
    assert s.values["gga.lat"] == pytest.approx(59.8166435)
    assert s.values["gga.lon"] == pytest.approx(10.361301833333334)
    assert s.values["gga.quality"] == 4
    assert s.values["gga.dgps_age"] == 1.0
    assert s.values["gga.dgps_station"] == "1405"


def test_rmc_decodes_with_timestamp() -> None:
    s = parse_sentence(RMC)
    assert s.values == {
        "rmc.time": "12:35:19",
        "rmc.valid": True,
        "rmc.lat": pytest.approx(48 + 7.038 / 60),
        "rmc.lon": pytest.approx(11 + 31.0 / 60),
        "rmc.speed_knots": 22.4,
        "rmc.course": 84.4,
        "rmc.date": "1994-03-23",
        "rmc.magnetic_variation": -3.1,
        "rmc.mode": None,
        "rmc.timestamp": 764426119.0,  # 1994-03-23T12:35:19Z
    }
    assert s.ts == 764426119.0


def test_rmc_western_longitude_and_eastern_variation() -> None:
    s = parse_sentence("$GPRMC,225446,A,4916.45,N,12311.12,W,000.5,054.7,191104,020.3,E*61")
    assert s.values["rmc.lat"] == pytest.approx(49.2741666666)
    assert s.values["rmc.lon"] == pytest.approx(-123.1853333333)
    assert s.values["rmc.magnetic_variation"] == 20.3
    assert s.values["rmc.date"] == "2004-11-19"
    assert s.ts == 1100904886.0  # 2004-11-19T22:54:46Z


def test_rmc_nmea41_with_navigation_status() -> None:
    s = parse_sentence(
        "$GNRMC,153523.00,A,6401.148556,N,02113.221761,W,46.1,40.8,220823,18.2,W,A,V*67"
    )
    assert s.values["rmc.lat"] == pytest.approx(64 + 1.148556 / 60)
    assert s.values["rmc.lon"] == pytest.approx(-(21 + 13.221761 / 60))
    assert s.values["rmc.mode"] == "A"
    assert s.values["rmc.date"] == "2023-08-22"
    assert s.values["rmc.magnetic_variation"] == -18.2


def test_generic_sentences_named_and_numbered() -> None:
    vtg = parse_sentence("$GPVTG,054.7,T,034.4,M,005.5,N,010.2,K*48")
    assert vtg.values == {
        "vtg.course_true": 54.7,
        "vtg.course_magnetic": 34.4,
        "vtg.speed_knots": 5.5,
        "vtg.speed_kmh": 10.2,
    }
    gsa = parse_sentence("$GPGSA,A,3,07,08,11,13,17,27,28,,,,,,05.3,02.0,04.8*0E")
    assert gsa.values["gsa.fix"] == 3
    assert gsa.values["gsa.prn1"] == 7
    assert gsa.values["gsa.prn8"] is None
    assert gsa.values["gsa.hdop"] == 2.0
    gsv = parse_sentence("$GPGSV,3,1,11,07,48,103,46,08,58,171,47,11,22,075,36,13,26,021,45*72")
    assert gsv.type == "GSV"
    assert gsv.values["gsv.1"] == 3
    assert gsv.values["gsv.3"] == 11
    assert gsv.values["gsv.19"] == 45


def test_gll_talker_sentence_numbered() -> None:
    s = parse_sentence("$GPGLL,3751.65,S,14507.36,E*77")
    assert s.values == {"gll.1": 3751.65, "gll.2": "S", "gll.3": 14507.36, "gll.4": "E"}


def test_xdr_and_proprietary() -> None:
    body = "WIXDR,C,22.5,C,AIRTEMP,P,1.0132,B,BARO"
    s = parse_sentence(f"${body}*{checksum(body):02X}")
    assert s.values == {"xdr.AIRTEMP": 22.5, "xdr.BARO": 1.0132}
    body = "PGRME,15.0,M,45.0,M,25.0,M"
    s = parse_sentence(f"${body}*{checksum(body):02X}")
    assert (s.talker, s.type) == ("P", "GRME")
    assert s.values["pgrme.1"] == 15.0


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (GGA[:-2] + "48", "checksum mismatch"),
        (GGA.replace("4807.038", "4807.039"), "checksum mismatch"),
        (GGA[: GGA.index("*")], "no checksum"),
        (GGA[:-1], "bad checksum field"),
        ("GPGGA,123519*00", "starting a sentence"),
        ("$gpgga,1*6B", "bad address"),
        ("$G\x01GGA*00", "non-printable"),
        ("", "starting a sentence"),
    ],
)
def test_bad_sentences_are_rejected(text: str, why: str) -> None:
    with pytest.raises(NmeaError, match=why):
        parse_sentence(text)


def test_checksum_optional_when_allowed() -> None:
    s = parse_sentence(GGA[: GGA.index("*")], require_checksum=False)
    assert s.values["gga.satellites"] == 8


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("GPGGA,123519,4807.038,X,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "hemisphere"),
        ("GPGGA,123519,4867.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "out of range"),
        ("GPGGA,1235,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "bad UTC time"),
        ("GPGGA,123519,4807.038,N,01131.000,E,1,x8,0.9,545.4,M,46.9,M,,", "satellites"),
        ("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,310294,003.1,W", "date"),
        ("GPRMC,123519,Q,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W", "status"),
    ],
)
def test_bad_fields_with_good_checksum_are_rejected(body: str, why: str) -> None:
    with pytest.raises(NmeaError, match=why):
        parse_sentence(f"${body}*{checksum(body):02X}")


def test_no_fix_fields_are_none() -> None:
    body = "GPGGA,235947.000,,,,,0,00,,,M,,M,,"
    s = parse_sentence(f"${body}*{checksum(body):02X}")
    assert s.values["gga.lat"] is None
    assert s.values["gga.quality"] == 0
    assert s.values["gga.altitude"] is None
